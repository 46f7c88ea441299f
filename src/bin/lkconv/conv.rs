//! `lkconv conv`: one pass on tensors from a safetensors file, written to another.

use half::{bf16, f16};
use lkconv::device::{self, Device, Impl, Op};
use lkconv::safetensors_io::{self, TensorFile};
use lkconv::{DType, Element, Error, Result, Tensor};

use crate::args::pair;
use crate::ConvArgs;

pub fn run(args: &ConvArgs) -> Result<()> {
    let op: Op = args.op.parse()?;
    let device: Device = args.device.parse()?;
    let dtype: DType = args.dtype.parse()?;
    let imp: Impl = args.implementation.parse()?;
    let file = TensorFile::read(&args.input)?;
    safetensors_io::check_writable(&args.output)?;
    let (name, out) = match dtype {
        DType::F32 => compute::<f32>(op, device, imp, args, &file)?,
        DType::F16 => compute::<f16>(op, device, imp, args, &file)?,
        DType::Bf16 => compute::<bf16>(op, device, imp, args, &file)?,
    };
    safetensors_io::write(&args.output, &[(name, &out)], None)
}

fn kernel_of(w: &Tensor<f32>) -> Result<(usize, usize)> {
    match w.shape() {
        [_, 1, kh, kw] => Ok((*kh, *kw)),
        other => Err(Error::Shape {
            what: "weight w".into(),
            expected: "[C, 1, KH, KW]".into(),
            got: other.to_vec(),
        }),
    }
}

fn compute<T: Element>(
    op: Op,
    device: Device,
    imp: Impl,
    args: &ConvArgs,
    file: &TensorFile,
) -> Result<(&'static str, Tensor<f32>)> {
    let get = |name: &str| file.get(name).map(|t| t.cast::<T>());
    let out = match op {
        Op::Forward => {
            let w = get("w")?;
            let (kh, kw) = kernel_of(file.get("w")?)?;
            let conv = args.geometry.conv((kh, kw))?;
            let bias = file.get_optional("bias")?.map(|b| b.cast::<T>());
            (
                "y",
                device::forward(device, imp, &conv, &get("x")?, &w, bias.as_ref())?,
            )
        }
        Op::DataGrad => {
            let dy = get("dy")?;
            let (kh, kw) = kernel_of(file.get("w")?)?;
            let conv = args.geometry.conv((kh, kw))?;
            let hw = match &args.input_hw {
                Some(s) => pair("--input-hw", s)?,
                None => match dy.shape() {
                    [_, _, h, w] => (*h, *w),
                    other => {
                        return Err(Error::Shape {
                            what: "output gradient dy".into(),
                            expected: "[N, C, OH, OW]".into(),
                            got: other.to_vec(),
                        })
                    }
                },
            };
            (
                "dx",
                device::data_grad(device, imp, &conv, &dy, &get("w")?, hw)?,
            )
        }
        Op::WeightGrad => {
            let k = args
                .kernel
                .as_deref()
                .ok_or_else(|| Error::InvalidArgument("wgrad needs --kernel KH,KW".into()))?;
            let (kh, kw) = pair("--kernel", k)?;
            let conv = args.geometry.conv((kh, kw))?;
            (
                "dw",
                device::weight_grad(device, imp, &conv, &get("x")?, &get("dy")?)?,
            )
        }
    };
    Ok((out.0, out.1.cast::<f32>()))
}
