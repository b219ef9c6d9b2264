//! The `sandboxer-host` binary: parse, call the library, print.
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
