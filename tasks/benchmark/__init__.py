"""The paper's benchmark: dataset readers for the official download layouts, the suites, and the benchmark run."""
