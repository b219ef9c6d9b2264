//! `serve`: the host as a server (see `sandboxer_host::server`).

use super::Context;
use anyhow::Result;
use sandboxer_host::server::{self, ServeOptions};
use std::path::PathBuf;

pub async fn run(
    context: &Context,
    listen: &str,
    operator_key_file: Option<PathBuf>,
) -> Result<()> {
    let config = context.config(true)?;
    let options = ServeOptions {
        listen: listen.to_string(),
        operator_key_file,
    };
    server::serve(config, options, |line| eprintln!("{line}")).await?;
    Ok(())
}
