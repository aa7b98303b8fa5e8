"""The image pipeline: fetch -> compress -> store, each stage failing with an ImageFailure."""
