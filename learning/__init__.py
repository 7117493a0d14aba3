"""Learning from labels: training jobs that make new versions of a dataset's encoder from its stored labels,
judged on labels they did not train on, and the switch that makes a version serve."""
