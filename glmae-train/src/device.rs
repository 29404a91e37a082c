//! Choosing where tensors live: `cpu` (burn's flex backend, the default), `ndarray` (deprecated in
//! burn, kept selectable), `cuda` / `cuda:N` (behind the `cuda` cargo feature), several GPUs as
//! `cuda:0,cuda:1` or `cuda:all`, and the floating-point precision tensors are stored in.

use anyhow::{Result, bail};
use burn::tensor::{Device, FloatDType};
use serde::{Deserialize, Serialize};

/// The floating-point type every float tensor of a training run is stored and computed in
/// (not the `.glmae` file's weight storage, which is `glmae_core::format::Precision`).
///
/// burn 0.22 sets this per device (`Device::configure`), for parameters and activations alike:
/// `bf16` halves memory and is meant for GPUs' bf16 matrix units, without an f32 master copy of the
/// weights (what burn supports today, unlike PyTorch's autocast).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ComputePrecision {
    /// 32-bit IEEE floats (the default).
    #[default]
    F32,
    /// bfloat16: f32's range with an 8-bit mantissa; the usual choice for training.
    Bf16,
    /// IEEE half precision: more mantissa, little range; losses may overflow.
    F16,
}

/// A device for training (with autodiff) from its command-line name.
pub fn training_device(name: &str) -> Result<Device> {
    Ok(base_device(name)?.autodiff())
}

/// Training devices from a command-line list (`cpu`, `cuda:1`, `cuda:0,cuda:1`, `cuda:all`), each
/// configured for `precision` and wrapped for autodiff.
pub fn training_devices(spec: &str, precision: ComputePrecision) -> Result<Vec<Device>> {
    let names: Vec<String> = if spec == "cuda:all" {
        (0..cuda_count()?).map(|i| format!("cuda:{i}")).collect()
    } else {
        spec.split(',').map(|s| s.trim().to_string()).collect()
    };
    let mut devices = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            bail!("device {name} is listed twice in {spec:?}");
        }
        let device = device_named(name, Some(precision)).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        devices.push(device.autodiff());
    }
    if devices.len() > 1 && names.iter().any(|n| !n.starts_with("cuda")) {
        bail!("several devices ({spec:?}) need CUDA: burn's gradient all-reduce runs on GPUs only");
    }
    Ok(devices)
}

/// Sets the device's default float type. burn fixes it once per device and process, so asking
/// again for the type it already has is fine and asking for another is an error.
fn configure(device: &mut Device, precision: ComputePrecision) -> Result<()> {
    let dtype = match precision {
        ComputePrecision::F32 => FloatDType::F32,
        ComputePrecision::Bf16 => FloatDType::BF16,
        ComputePrecision::F16 => FloatDType::F16,
    };
    if device.configure(dtype).is_ok() || device.settings().float_dtype == dtype {
        return Ok(());
    }
    bail!(
        "cannot use {precision:?}: this device already computes in {:?} (precision must be chosen \
         before the device makes its first tensor) or does not support it",
        device.settings().float_dtype
    )
}

/// burn's `BURN_DEVICE` name of the CPU backend a device list asks for (`flex`, `ndarray`), or
/// `None` for GPUs.
pub fn cpu_backend_name(spec: &str) -> Option<&'static str> {
    match spec {
        "cpu" | "flex" => Some("flex"),
        "ndarray" => Some("ndarray"),
        _ => None,
    }
}

/// A device from its command-line name, without autodiff, in whatever float type it has.
pub fn base_device(name: &str) -> Result<Device> {
    device_named(name, None)
}

/// A device from its command-line name, its float type set to `precision` when given.
fn device_named(name: &str, precision: Option<ComputePrecision>) -> Result<Device> {
    let mut device = match name {
        "cpu" | "flex" => Device::flex(),
        // Deprecated in burn 0.22 in favour of flex; kept selectable for comparison.
        #[allow(deprecated)]
        "ndarray" => Device::ndarray(),
        // The probe that checks a GPU is there makes a tensor, so the type is set before it.
        n if n == "cuda" || n.starts_with("cuda:") => {
            return cuda(n.strip_prefix("cuda:").unwrap_or("0"), precision);
        }
        other => bail!("unknown device {other:?}; expected cpu, ndarray, cuda or cuda:N"),
    };
    if let Some(precision) = precision {
        configure(&mut device, precision)?;
    }
    Ok(device)
}

#[cfg(feature = "cuda")]
fn cuda(index: &str, precision: Option<ComputePrecision>) -> Result<Device> {
    let i: usize = index.parse().map_err(|_| anyhow::anyhow!("invalid CUDA device index {index:?}"))?;
    // cudarc loads the driver on first use and panics when it cannot: turn that into an error,
    // without the panic message the default hook would print first.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        let mut d = Device::cuda(i);
        let configured = precision.map_or(Ok(()), |p| configure(&mut d, p));
        let _ = burn::tensor::Tensor::<1>::zeros([1], &d).into_data();
        configured.map(|()| d)
    });
    std::panic::set_hook(hook);
    probe.map_err(|_| anyhow::anyhow!("CUDA device {i} is not usable: no NVIDIA driver/GPU found (libcuda could not be loaded) or the index does not exist"))?
}

#[cfg(feature = "cuda")]
fn cuda_count() -> Result<usize> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let n = std::panic::catch_unwind(|| Device::enumerate(burn::tensor::DeviceType::Cuda).into_vec().len());
    std::panic::set_hook(hook);
    let n = n.map_err(|_| anyhow::anyhow!("cannot list CUDA devices: no NVIDIA driver/GPU found"))?;
    if n == 0 {
        bail!("cuda:all: no CUDA device found");
    }
    Ok(n)
}

#[cfg(not(feature = "cuda"))]
fn cuda_count() -> Result<usize> {
    cuda("all", None).map(|_| 0)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: &str, _precision: Option<ComputePrecision>) -> Result<Device> {
    bail!(
        "this glmae-train was built without CUDA support; rebuild with `cargo build --release -p glmae-train --features cuda`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_runs_name_their_backend_as_burns_default() {
        assert_eq!(cpu_backend_name("cpu"), Some("flex"));
        assert_eq!(cpu_backend_name("ndarray"), Some("ndarray"));
        assert_eq!(cpu_backend_name("cuda:0"), None);
        assert_eq!(cpu_backend_name("cuda:0,cuda:1"), None);
    }

    #[test]
    fn names_map_to_backends_and_bad_names_are_errors() {
        assert!(base_device("cpu").is_ok());
        assert!(base_device("ndarray").is_ok());
        let e = base_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device \"tpu\""), "{e}");
        #[cfg(not(feature = "cuda"))]
        assert!(base_device("cuda:1").unwrap_err().to_string().contains("--features cuda"));
        #[cfg(not(feature = "cuda"))]
        assert!(
            training_devices("cuda:all", ComputePrecision::F32)
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
    }

    #[test]
    fn device_lists_are_checked() {
        assert_eq!(training_devices("cpu", ComputePrecision::F32).unwrap().len(), 1);
        let e = training_devices("cpu,cpu", ComputePrecision::F32).unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
        let e = training_devices("cpu,ndarray", ComputePrecision::F32).unwrap_err().to_string();
        assert!(e.contains("need CUDA"), "{e}");
    }
}
