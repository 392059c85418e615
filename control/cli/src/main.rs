//! tendrilctl: parse arguments, run the command, map the outcome to an exit code
//! (0 ok, 1 failure, 2 usage).

use std::process::ExitCode;

use clap::Parser;
use tendril_control::args::Cli;

fn main() -> ExitCode {
    // clap exits with 2 on a usage error and 0 for --help/--version.
    let cli = Cli::parse();
    tendril_daemon::init_logging("warn");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tendrilctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tendril_control::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tendrilctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
