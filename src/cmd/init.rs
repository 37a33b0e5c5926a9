//! `walsync init`: writes a starter walsync.toml.

use super::*;

/// The starter `walsync init` writes; a test checks that it loads.
pub const STARTER: &str = include_str!("starter.toml");

pub(super) fn init(args: &InitArgs) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&args.output)
        .with_context(|| {
            format!(
                "creating {} (an existing file is never replaced)",
                args.output.display()
            )
        })?;
    file.write_all(STARTER.as_bytes())
        .with_context(|| format!("writing {}", args.output.display()))?;
    sayln!(
        "wrote {}; edit it, check it with `walsync explain --config {0}`, run it with `walsync watch --config {0}`",
        args.output.display()
    );
    Ok(())
}
