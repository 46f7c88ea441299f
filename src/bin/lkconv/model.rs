//! `lkconv replknet`, `lkconv classify`, `lkconv bench --model` (stub: being written).
use crate::{BenchArgs, ClassifyArgs, ReplknetArgs};
use lkconv::{Error, Result};

pub fn replknet(_args: &ReplknetArgs) -> Result<()> {
    Err(Error::Unsupported("replknet: not yet available".into()))
}
pub fn classify(_args: &ClassifyArgs) -> Result<()> {
    Err(Error::Unsupported("classify: not yet available".into()))
}
pub fn bench(_args: &BenchArgs) -> Result<()> {
    Err(Error::Unsupported("bench --model: not yet available".into()))
}
