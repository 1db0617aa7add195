//! Empty: see Cargo.toml (only the dependency's files are used, nothing is compiled).
