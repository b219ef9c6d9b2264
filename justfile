# Thin aliases: every recipe calls `cargo xtask`, where the logic lives.

# Build every extension and test fixture into target/
build-extensions:
    cargo xtask build-extensions

# The CI gate: build-extensions, fmt check, clippy -D warnings, cargo test
test:
    cargo xtask test

# Build and run the main job against a fresh home
demo:
    cargo xtask demo

# Benchmarks: runtime, routing, ledger, lifecycle or all
bench suite="all":
    cargo xtask bench {{suite}}
