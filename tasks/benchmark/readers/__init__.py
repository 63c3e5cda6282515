"""One module per dataset format, each exposing ``FORMAT`` (a ``tasks.benchmark.datasets.DatasetFormat``)."""
