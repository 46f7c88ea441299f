//! The problem description: shape inference, validation of every input, the reference itself on
//! hand-computed cases.

use lkconv::{cpu, DwConv2d, Error, Padding, Tensor};

#[test]
fn output_shapes() {
    assert_eq!(DwConv2d::new(31, 31).output_hw(56, 56).unwrap(), (56, 56));
    assert_eq!(DwConv2d::new(4, 4).output_hw(10, 10).unwrap(), (11, 11)); // even kernel, pad 2
    assert_eq!(
        DwConv2d::new(3, 3)
            .with_stride(2, 2)
            .output_hw(7, 8)
            .unwrap(),
        (4, 4)
    );
    assert_eq!(
        DwConv2d::new(3, 3)
            .with_dilation(2, 2)
            .with_padding(0, 0)
            .output_hw(9, 9)
            .unwrap(),
        (5, 5)
    );
    assert_eq!(DwConv2d::new(31, 31).output_hw(7, 7).unwrap(), (7, 7)); // kernel larger than image
    let asym = DwConv2d::new(3, 5).with_padding_sides(Padding {
        top: 0,
        bottom: 2,
        left: 4,
        right: 0,
    });
    assert_eq!(asym.output_hw(6, 6).unwrap(), (6, 6));
}

#[test]
fn bad_parameters_are_typed_errors() {
    assert!(matches!(
        DwConv2d::new(0, 3).validate(),
        Err(Error::ZeroSize { .. })
    ));
    assert!(matches!(
        DwConv2d::new(3, 3).with_stride(0, 1).validate(),
        Err(Error::ZeroSize { .. })
    ));
    assert!(matches!(
        DwConv2d::new(3, 3).with_dilation(1, 0).validate(),
        Err(Error::ZeroSize { .. })
    ));
    assert!(matches!(
        DwConv2d::new(9, 9).with_padding(0, 0).output_hw(4, 4),
        Err(Error::EmptyOutput(_))
    ));
    assert!(matches!(
        DwConv2d::new(3, 3).resolve(0, 1, 5, 5),
        Err(Error::ZeroSize { .. })
    ));
    assert!(matches!(
        DwConv2d::new(3, 3).resolve(1, 0, 5, 5),
        Err(Error::ZeroSize { .. })
    ));
    assert!(matches!(
        DwConv2d::new(3, 3).resolve(1, 1, 0, 5),
        Err(Error::ZeroSize { .. })
    ));
    assert!(matches!(
        DwConv2d::new(3, 3).resolve(usize::MAX, 2, 5, 5),
        Err(Error::Overflow(_))
    ));
    assert!(matches!(
        DwConv2d::new(3, 3).resolve(1, 1, 1 << 20, 1 << 12),
        Err(Error::Overflow(_))
    ));
    assert!(matches!(
        DwConv2d::new(usize::MAX, 3).validate(),
        Err(Error::Overflow(_))
    ));
    assert!(matches!(
        DwConv2d::new(3, 3)
            .with_dilation(usize::MAX / 2, 1)
            .with_padding(0, 0)
            .output_hw(5, 5),
        Err(Error::Overflow(_))
    ));
}

#[test]
fn bad_shapes_are_typed_errors() {
    let conv = DwConv2d::new(3, 3);
    let x = Tensor::<f32>::full(&[1, 4, 8, 8], 0.5).unwrap();
    let w_wrong_c = Tensor::<f32>::full(&[3, 1, 3, 3], 0.5).unwrap();
    let w_wrong_k = Tensor::<f32>::full(&[4, 1, 5, 5], 0.5).unwrap();
    let w_dense = Tensor::<f32>::full(&[4, 4, 3, 3], 0.5).unwrap();
    let w = Tensor::<f32>::full(&[4, 1, 3, 3], 0.5).unwrap();
    let bias_wrong = Tensor::<f32>::full(&[5], 0.5).unwrap();
    let x3 = Tensor::<f32>::full(&[4, 8, 8], 0.5).unwrap();
    for w_bad in [&w_wrong_c, &w_wrong_k, &w_dense] {
        assert!(matches!(
            cpu::forward(&conv, &x, w_bad, None),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            cpu::reference::forward(&conv, &x, w_bad, None),
            Err(Error::Shape { .. })
        ));
    }
    assert!(matches!(
        cpu::forward(&conv, &x, &w, Some(&bias_wrong)),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        cpu::forward(&conv, &x3, &w, None),
        Err(Error::Shape { .. })
    ));
    // dy that is not the output of the stated input size.
    let dy = Tensor::<f32>::full(&[1, 4, 7, 8], 0.5).unwrap();
    assert!(matches!(
        cpu::data_grad(&conv, &dy, &w, (8, 8)),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        cpu::weight_grad(&conv, &x, &dy),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        Tensor::<f32>::from_vec(&[2, 2], vec![1.0; 3]),
        Err(Error::BufferLength { .. })
    ));
    assert!(matches!(
        Tensor::<f32>::zeros(&[usize::MAX, 2]),
        Err(Error::Overflow(_))
    ));
    // 2^62 floats: a count that fits usize but a size no allocator grants.
    for t in [
        Tensor::<f32>::zeros(&[1 << 31, 1 << 31]),
        Tensor::<f32>::random(&[1 << 31, 1 << 31], &mut lkconv::Rng::new(1)),
    ] {
        assert!(
            matches!(&t, Err(e @ Error::OutOfMemory { .. }) if e.is_out_of_memory()),
            "{:?}",
            t.map(|t| t.len())
        );
    }
}

/// A weight too large to address is refused with the shape, before any tensor exists.
#[test]
fn a_weight_too_large_to_address_is_refused() {
    let conv = DwConv2d::new(1 << 28, 1 << 28).with_padding(1 << 27, 1 << 27);
    assert!(matches!(
        conv.resolve(1, 256, 2, 2),
        Err(Error::Overflow(_))
    ));
    assert!(matches!(
        DwConv2d::new(1 << 20, 1 << 21)
            .with_padding(1 << 20, 1 << 20)
            .resolve(1, 1, 1, 1),
        Err(Error::Overflow(_))
    ));
}

/// A weight gradient of 2^40 floats (4 TiB) from 1-element tensors: the engine reports the
/// failed allocation instead of aborting. Needs a host that refuses such a request
/// (`vm.overcommit_memory` 0 or 2, Linux's default); with 1 the kernel would grant it lazily.
#[test]
fn an_output_larger_than_memory_is_a_typed_error() {
    if let Ok(mode) = std::fs::read_to_string("/proc/sys/vm/overcommit_memory") {
        assert_ne!(
            mode.trim(),
            "1",
            "vm.overcommit_memory = 1 grants any allocation; this test needs 0 or 2"
        );
    }
    let conv = DwConv2d::new(1 << 20, 1 << 20).with_padding(1 << 19, 1 << 19);
    let conv = DwConv2d {
        padding: Padding {
            bottom: (1 << 19) - 1,
            right: (1 << 19) - 1,
            ..conv.padding
        },
        ..conv
    };
    let x = Tensor::<f32>::full(&[1, 1, 1, 1], 0.25).unwrap();
    let dy = Tensor::<f32>::full(&[1, 1, 1, 1], 0.5).unwrap();
    let r = cpu::weight_grad(&conv, &x, &dy);
    assert!(
        matches!(&r, Err(Error::OutOfMemory { bytes, .. }) if *bytes == 4 << 40),
        "{:?}",
        r.map(|t| t.len())
    );
}

/// The im2col baseline's patch matrix (OH*OW*KH*KW entries; here 2048^2 * 2047^2, 140 TB of
/// indices) from tensors of 16 MiB: each pass reports the failed allocation instead of aborting.
/// Needs `vm.overcommit_memory` 0 or 2, like the test above.
#[test]
fn an_im2col_patch_matrix_larger_than_memory_is_a_typed_error() {
    if let Ok(mode) = std::fs::read_to_string("/proc/sys/vm/overcommit_memory") {
        assert_ne!(
            mode.trim(),
            "1",
            "this test needs vm.overcommit_memory 0 or 2"
        );
    }
    let conv = DwConv2d::new(2047, 2047);
    // (the values never reach a kernel: the table is refused before any arithmetic)
    let x = Tensor::<f32>::full(&[1, 1, 2048, 2048], 0.25).unwrap();
    let w = Tensor::<f32>::full(&[1, 1, 2047, 2047], 0.5).unwrap();
    let table_bytes = 2048usize * 2048 * 2047 * 2047 * 8;
    let oom = |r: Result<Tensor<f32>, Error>| match r {
        Err(Error::OutOfMemory { bytes, what }) => {
            assert_eq!(bytes, table_bytes, "{what}");
        }
        other => panic!("expected OutOfMemory, got {:?}", other.map(|t| t.len())),
    };
    oom(cpu::im2col::forward(&conv, &x, &w, None));
    oom(cpu::im2col::data_grad(&conv, &x, &w, (2048, 2048)));
    oom(cpu::im2col::weight_grad(&conv, &x, &x));
}

#[test]
fn reference_forward_by_hand() {
    // 1 channel, 3x3 input 1..9, 2x2 filter [[1, 2], [3, 4]], no padding:
    // y[0,0] = 1*1 + 2*2 + 4*3 + 5*4 = 37; y[0,1] = 2 + 6 + 15 + 24 = 47;
    // y[1,0] = 4 + 10 + 21 + 32 = 67; y[1,1] = 5 + 12 + 24 + 36 = 77; plus bias 0.5.
    let conv = DwConv2d::new(2, 2).with_padding(0, 0);
    let x = Tensor::from_vec(&[1, 1, 3, 3], (1..=9).map(|v| v as f32).collect()).unwrap();
    let w = Tensor::from_vec(&[1, 1, 2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let b = Tensor::from_vec(&[1], vec![0.5f32]).unwrap();
    let y = cpu::reference::forward(&conv, &x, &w, Some(&b)).unwrap();
    assert_eq!(y.shape(), &[1, 1, 2, 2]);
    assert_eq!(y.data(), &[37.5, 47.5, 67.5, 77.5]);

    // Same padding 1 with a 3x3 all-ones filter: the corner sums its 2x2 neighbourhood.
    let conv = DwConv2d::new(3, 3);
    let ones = Tensor::from_vec(&[1, 1, 3, 3], vec![1.0f32; 9]).unwrap();
    let y = cpu::reference::forward(&conv, &x, &ones, None).unwrap();
    assert_eq!(
        y.data(),
        &[12.0, 21.0, 16.0, 27.0, 45.0, 33.0, 24.0, 39.0, 28.0]
    );
}

#[test]
fn reference_gradients_by_hand() {
    // 1x1x2x2 input, 1x1 filter w=3, stride 1: dx = 3 * dy, dw = sum(x * dy).
    let conv = DwConv2d::new(1, 1);
    let x = Tensor::from_vec(&[1, 1, 2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let dy = Tensor::from_vec(&[1, 1, 2, 2], vec![0.5f32, -1.0, 2.0, 0.25]).unwrap();
    let w = Tensor::from_vec(&[1, 1, 1, 1], vec![3.0f32]).unwrap();
    assert_eq!(
        cpu::reference::data_grad(&conv, &dy, &w, (2, 2))
            .unwrap()
            .data(),
        &[1.5, -3.0, 6.0, 0.75]
    );
    assert_eq!(
        cpu::reference::weight_grad(&conv, &x, &dy).unwrap().data(),
        &[0.5 - 2.0 + 6.0 + 1.0]
    );

    // Stride 2, 2x2 filter on a 1x1x2x4 input: two outputs; dx scatters each dy over its window.
    let conv = DwConv2d::new(2, 2).with_padding(0, 0).with_stride(2, 2);
    let w = Tensor::from_vec(&[1, 1, 2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let dy = Tensor::from_vec(&[1, 1, 1, 2], vec![1.0f32, 10.0]).unwrap();
    let dx = cpu::reference::data_grad(&conv, &dy, &w, (2, 4)).unwrap();
    assert_eq!(dx.data(), &[1.0, 2.0, 10.0, 20.0, 3.0, 4.0, 30.0, 40.0]);
    let x = Tensor::from_vec(&[1, 1, 2, 4], (1..=8).map(|v| v as f32).collect()).unwrap();
    let dw = cpu::reference::weight_grad(&conv, &x, &dy).unwrap();
    // dw[ky,kx] = 1 * x[ky, kx] + 10 * x[ky, kx + 2]
    assert_eq!(dw.data(), &[1.0 + 30.0, 2.0 + 40.0, 5.0 + 70.0, 6.0 + 80.0]);
}
