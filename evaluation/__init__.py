"""`llmatch evaluate`: matching quality on DeepMatcher-layout benchmarks, measured through the service."""
