use lkconv::Result;
pub fn run() -> Result<()> { Ok(()) }
