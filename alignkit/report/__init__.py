"""`alignkit report`: one HTML page (and optionally Markdown) of one run or a comparison of runs.

collect (read run directories) -> sections (what the report shows, as `document` data, with
`plots` and `samples`) -> html / markdown (render). `command.main(argv)` is the command line."""
