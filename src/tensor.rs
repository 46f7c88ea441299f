//! A small owned host tensor: a shape and a contiguous row-major buffer.

use crate::dtype::Element;
use crate::error::{Error, Result};

/// Row-major (NCHW for images) host tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

/// Product of extents with overflow checking.
pub fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| Error::Overflow(format!("element count of shape {shape:?}")))
    })
}

/// A vector of `len` copies of `value`, or [`Error::OutOfMemory`] where the allocation fails:
/// how tensors, the engine's outputs and the model's activations are allocated.
pub fn try_filled<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    // A request the system refuses fails in this probe, as an error; the allocation itself then
    // keeps `vec!`'s zeroed-pages path for zeros (no pass writing them before the kernel does).
    reserve_total(&mut Vec::<T>::new(), len, what)?;
    Ok(vec![value; len])
}

/// An empty vector with capacity for `len` elements, or [`Error::OutOfMemory`].
pub fn try_with_capacity<T>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    reserve_total(&mut v, len, what)?;
    Ok(v)
}

/// Grows `v` to at least `len` elements (new ones `value`), or [`Error::OutOfMemory`].
pub fn try_grow<T: Clone>(v: &mut Vec<T>, len: usize, value: T, what: &str) -> Result<()> {
    reserve_total(v, len, what)?;
    if v.len() < len {
        v.resize(len, value);
    }
    Ok(())
}

/// Capacity for `len` elements in all, or [`Error::OutOfMemory`].
fn reserve_total<T>(v: &mut Vec<T>, len: usize, what: &str) -> Result<()> {
    v.try_reserve_exact(len.saturating_sub(v.len()))
        .map_err(|_| Error::OutOfMemory {
            what: what.into(),
            bytes: len.saturating_mul(std::mem::size_of::<T>()),
        })
}

impl<T: Element> Tensor<T> {
    /// Wraps `data`; fails when its length does not match the shape.
    pub fn from_vec(shape: &[usize], data: Vec<T>) -> Result<Self> {
        let numel = checked_numel(shape)?;
        if numel != data.len() {
            return Err(Error::BufferLength {
                what: format!("tensor data for shape {shape:?}"),
                expected: numel,
                got: data.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A tensor filled with `value`.
    pub fn full(shape: &[usize], value: T) -> Result<Self> {
        let numel = checked_numel(shape)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            data: try_filled(numel, value, &format!("a tensor of shape {shape:?}"))?,
        })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        Self::full(shape, T::default())
    }

    /// Uniform random values in [-1, 1) from a seeded generator.
    pub fn random(shape: &[usize], rng: &mut crate::rng::Rng) -> Result<Self> {
        let numel = checked_numel(shape)?;
        let mut data = Vec::new();
        reserve_total(&mut data, numel, &format!("a tensor of shape {shape:?}"))?;
        data.extend((0..numel).map(|_| T::from_f32(rng.uniform_pm1())));
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn data(&self) -> &[T] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
    pub fn into_vec(self) -> Vec<T> {
        self.data
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Same data, another shape of the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        Self::from_vec(shape, self.data)
    }

    /// Converts every element to another storage type through f32.
    pub fn cast<U: Element>(&self) -> Tensor<U> {
        Tensor {
            shape: self.shape.clone(),
            data: self.data.iter().map(|v| U::from_f32(v.to_f32())).collect(),
        }
    }

    /// The elements as f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.data.iter().map(|v| v.to_f32()).collect()
    }
}
