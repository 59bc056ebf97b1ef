"""The model's side of the memory model: its shape (config.json read completely), its parameter
counts per module, what its weights weigh in each format, and the vocabulary every engine's
memory model answers in (`footprint.Component`, each with its source).

Pure, no I/O beyond reading a config.json; imported by the engines (each engine's module holds
its own memory model) and by the daemon. It imports neither."""
