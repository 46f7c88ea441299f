//! Device tensors and reusable workspaces.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use super::driver::driver_err;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::tensor::{checked_numel, Tensor};

/// An element type that can live in device memory: f32, f16, bf16 (cudarc's `f16` feature
/// provides `DeviceRepr` and `ValidAsZeroBits` for the half types).
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits + Unpin {}
impl CudaElement for f32 {}
impl CudaElement for f16 {}
impl CudaElement for bf16 {}

/// A row-major (NCHW) tensor in device memory: a cudarc buffer plus its shape; the dtype is
/// `T::DTYPE`.
///
/// The buffer belongs to the stream it was allocated on (it is freed there); cudarc's event
/// tracking orders its uses on other streams of the same device.
#[derive(Debug)]
pub struct DeviceTensor<T: CudaElement> {
    buf: CudaSlice<T>,
    shape: Vec<usize>,
}

impl<T: CudaElement> DeviceTensor<T> {
    /// Copies a host tensor to the device (queued on `stream`; the host data has been read when
    /// this returns, so the host tensor may be dropped).
    pub fn from_host(stream: &Arc<CudaStream>, t: &Tensor<T>) -> Result<Self> {
        let buf = stream
            .clone_htod(t.data())
            .map_err(driver_err("copying a tensor to the device"))?;
        Ok(DeviceTensor {
            buf,
            shape: t.shape().to_vec(),
        })
    }

    /// A tensor of zeros (allocated and cleared on `stream`).
    pub fn zeros(stream: &Arc<CudaStream>, shape: &[usize]) -> Result<Self> {
        let len = checked_numel(shape)?;
        let buf = stream
            .alloc_zeros::<T>(len)
            .map_err(driver_err("allocating a device tensor"))?;
        Ok(DeviceTensor {
            buf,
            shape: shape.to_vec(),
        })
    }

    /// Copies the tensor back to the host. This synchronises: it waits for all work queued on
    /// the tensor's stream (and, through event tracking, for writes queued on other streams).
    pub fn to_host(&self) -> Result<Tensor<T>> {
        let stream = self.buf.stream();
        let data = stream
            .clone_dtoh(&self.buf)
            .map_err(driver_err("copying a tensor to the host"))?;
        stream
            .synchronize()
            .map_err(driver_err("synchronising after a copy to the host"))?;
        Tensor::from_vec(&self.shape, data)
    }

    /// Overwrites the contents from a host tensor of the same shape (queued on `stream`).
    pub fn copy_from_host(&mut self, stream: &Arc<CudaStream>, t: &Tensor<T>) -> Result<()> {
        if t.shape() != self.shape.as_slice() {
            return Err(Error::shape(
                "host tensor copied to the device",
                format!("{:?}", self.shape),
                t.shape(),
            ));
        }
        stream
            .memcpy_htod(t.data(), &mut self.buf)
            .map_err(driver_err("copying a tensor to the device"))
    }

    /// Same buffer, another shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        let len = checked_numel(shape)?;
        if len != self.buf.len() {
            return Err(Error::BufferLength {
                what: format!("device tensor reshaped to {shape:?}"),
                expected: len,
                got: self.buf.len(),
            });
        }
        Ok(DeviceTensor {
            buf: self.buf,
            shape: shape.to_vec(),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// Size in bytes.
    pub fn num_bytes(&self) -> usize {
        self.buf.num_bytes()
    }
    /// The device ordinal of the buffer.
    pub fn ordinal(&self) -> usize {
        self.buf.ordinal()
    }
    /// The stream the buffer was allocated on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.buf.stream()
    }
    /// The underlying cudarc buffer.
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.buf
    }
    /// The underlying cudarc buffer, mutably.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.buf
    }

    /// The device pointer for a read on `stream`, and the guard that records the read when
    /// dropped (drop it after the launch is queued).
    pub(crate) fn read_ptr<'a>(
        &'a self,
        stream: &'a CudaStream,
    ) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
        self.buf.device_ptr(stream)
    }

    /// The device pointer for a write on `stream`, and the guard that records the write.
    pub(crate) fn write_ptr<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
        self.buf.device_ptr_mut(stream)
    }
}

/// A growable scratch buffer on one stream (a [`CudaExec`](super::CudaExec)'s plan
/// workspace: the im2col patch matrix, weight-gradient partial sums). It grows to the largest
/// request and is never shrunk.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    buf: Option<CudaSlice<u8>>,
}

impl Workspace {
    /// An empty workspace (allocates on first use).
    pub fn new() -> Self {
        Workspace { buf: None }
    }

    /// Current size in bytes.
    pub fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// Makes the workspace at least `bytes` long (a new allocation on `stream` when it grows;
    /// the old buffer is freed on its own stream after its pending uses).
    pub(crate) fn ensure(&mut self, stream: &Arc<CudaStream>, bytes: usize) -> Result<()> {
        if bytes == 0 || self.capacity() >= bytes {
            return Ok(());
        }
        self.buf = None;
        // Rounded up to 256 bytes so that every sub-buffer a plan carves out stays aligned.
        let bytes = bytes
            .checked_next_multiple_of(256)
            .ok_or_else(|| Error::Overflow(format!("workspace of {bytes} bytes")))?;
        // SAFETY: a byte buffer, filled below before any use; the kernels treat the workspace
        // as scratch that every plan writes before it reads (a plan that needs zeros clears it).
        let buf = unsafe { stream.alloc::<u8>(bytes) }
            .map_err(|e| Error::driver(format!("allocating a {bytes}-byte workspace"), e))?;
        super::driver::poison(stream, &buf)
            .map_err(|e| Error::driver(format!("poisoning a {bytes}-byte workspace"), e))?;
        self.buf = Some(buf);
        Ok(())
    }

    /// The device pointer for use on `stream` (None when empty), with its write-recording guard.
    pub(crate) fn ptr<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> Option<(u64, cudarc::driver::SyncOnDrop<'a>)> {
        self.buf.as_mut().map(|b| b.device_ptr_mut(stream))
    }
}
