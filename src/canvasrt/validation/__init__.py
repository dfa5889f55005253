"""The tools that check and measure the runtime: parity against transformers' reference, accuracy on synthetic
tasks, and benchmarks. They drive the runtime through its public interface (executors, the loop, the scheduler)
and are never imported by it."""
