"""Chat above the runtime: the tokenizer, the V4 chat template and its output parser, sampling, and the
messages-in / pieces-out API that Model.chat and the server use."""
