pub fn run(_o: &crate::cli::RestoreOpts, _g: &crate::cli::Global) -> anyhow::Result<i32> { anyhow::bail!("not yet") }
