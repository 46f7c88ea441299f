//! Parsing of the CLI's small comma-separated values.

use lkconv::{DwConv2d, Error, Result};

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

/// The --padding, --stride and --dilation flags of the commands that take one convolution.
#[derive(clap::Args, Debug)]
pub struct GeometryArgs {
    /// P or PH,PW (default KH/2,KW/2).
    #[arg(long)]
    pub padding: Option<String>,
    /// S or SH,SW.
    #[arg(long, default_value = "1")]
    pub stride: String,
    /// D or DH,DW.
    #[arg(long, default_value = "1")]
    pub dilation: String,
}

impl GeometryArgs {
    /// The convolution these flags describe for a KH x KW kernel; validated.
    pub fn conv(&self, (kh, kw): (usize, usize)) -> Result<DwConv2d> {
        let mut conv = DwConv2d::new(kh, kw);
        if let Some(p) = &self.padding {
            let (ph, pw) = pair("--padding", p)?;
            conv = conv.with_padding(ph, pw);
        }
        let (sh, sw) = pair("--stride", &self.stride)?;
        let (dh, dw) = pair("--dilation", &self.dilation)?;
        let conv = conv.with_stride(sh, sw).with_dilation(dh, dw);
        conv.validate()?;
        Ok(conv)
    }
}

/// "K1,K2,..." (at least one, each at least 1, repeats dropped).
pub fn kernel_list(s: &str) -> Result<Vec<usize>> {
    let mut ks = Vec::new();
    for p in s.split(',').map(str::trim) {
        let k = p.parse::<usize>().ok().filter(|&k| k > 0).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--kernels: '{p}' in '{s}' is not a kernel size (K1,K2,... with K >= 1)"
            ))
        })?;
        if !ks.contains(&k) {
            ks.push(k);
        }
    }
    Ok(ks)
}
