//! `lockstep-cli`: see `lockstep-cli --help`.

fn main() -> std::process::ExitCode {
    lockstep_client::cli::main()
}
