//! Parsing of the CLI's small comma-separated values.

use lkconv::{Error, Result};

/// "A" or "A,B" into (A, A) or (A, B).
pub fn pair(what: &str, s: &str) -> Result<(usize, usize)> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let num = |p: &str| {
        p.parse::<usize>().map_err(|_| {
            Error::InvalidArgument(format!(
                "{what}: '{s}' is not N or N,M with non-negative integers"
            ))
        })
    };
    match parts.as_slice() {
        [a] => {
            let v = num(a)?;
            Ok((v, v))
        }
        [a, b] => Ok((num(a)?, num(b)?)),
        _ => Err(Error::InvalidArgument(format!(
            "{what}: '{s}' is not N or N,M"
        ))),
    }
}

/// "N,C,H,W".
pub fn shape4(s: &str) -> Result<[usize; 4]> {
    let v: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::InvalidArgument(format!("--shape: '{s}' is not N,C,H,W")))?;
    <[usize; 4]>::try_from(v)
        .map_err(|_| Error::InvalidArgument(format!("--shape: '{s}' is not N,C,H,W")))
}
