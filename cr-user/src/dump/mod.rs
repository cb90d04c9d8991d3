pub fn run(_o: &crate::cli::DumpOpts, _pre: bool) -> anyhow::Result<()> { anyhow::bail!("not yet") }
