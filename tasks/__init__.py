"""Units of work: pure, typed functions plus thin Prefect @task wrappers."""
