"""whq analyses: the SQL macros (queries/*.sql), their Polars twins (frames), charts and reports."""
