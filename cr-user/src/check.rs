pub fn run(_o: &crate::cli::CheckOpts) -> anyhow::Result<bool> { anyhow::bail!("not yet") }
