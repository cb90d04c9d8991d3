pub fn run(_o: &crate::cli::ShowOpts) -> anyhow::Result<()> { todo!() }
