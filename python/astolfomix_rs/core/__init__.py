"""The plan, its two executors (the Rust engine, the torch path), reading and saving."""
