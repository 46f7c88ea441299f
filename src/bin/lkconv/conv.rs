use lkconv::Result;
pub fn run(_args: &crate::ConvArgs) -> Result<()> { Ok(()) }
