//! tendrilctl: parse arguments, run the command, map the outcome to an exit code
//! (0 ok, 1 failure, 2 usage).

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use tendril_control::args::{Cli, DEFAULT_CONFIG, with_default_config};
use tendril_daemon::config_file;

fn main() -> ExitCode {
    let argv = with_default_config(
        std::env::args_os().collect(),
        std::env::var_os(config_file::ENV).is_some(),
        std::path::Path::new(DEFAULT_CONFIG).exists(),
    );
    let argv = match config_file::args_with_file(&Cli::command(), argv) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("tendrilctl: {e}");
            return ExitCode::from(2);
        }
    };
    // clap exits with 2 on a usage error and 0 for --help/--version.
    let cli = Cli::parse_from(argv);
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
