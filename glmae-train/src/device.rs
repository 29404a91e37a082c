//! Choosing where tensors live: `cpu` (burn's flex backend, the default), `ndarray` (deprecated in
//! burn, kept selectable), `cuda` / `cuda:N` (behind the `cuda` cargo feature).

use anyhow::{Result, bail};
use burn::tensor::Device;

/// A device for training (with autodiff) from its command-line name.
pub fn training_device(name: &str) -> Result<Device> {
    Ok(base_device(name)?.autodiff())
}

/// A device from its command-line name, without autodiff.
pub fn base_device(name: &str) -> Result<Device> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        // Deprecated in burn 0.22 in favour of flex; kept selectable for comparison.
        #[allow(deprecated)]
        "ndarray" => Ok(Device::ndarray()),
        n if n == "cuda" || n.starts_with("cuda:") => cuda(n.strip_prefix("cuda:").unwrap_or("0")),
        other => bail!("unknown device {other:?}; expected cpu, ndarray, cuda or cuda:N"),
    }
}

#[cfg(feature = "cuda")]
fn cuda(index: &str) -> Result<Device> {
    let i: usize = index.parse().map_err(|_| anyhow::anyhow!("invalid CUDA device index {index:?}"))?;
    // cudarc loads the driver on first use and panics when it cannot: turn that into an error.
    let probe = std::panic::catch_unwind(|| {
        let d = Device::cuda(i);
        let _ = burn::tensor::Tensor::<1>::zeros([1], &d).into_scalar::<f32>();
        d
    });
    probe.map_err(|_| anyhow::anyhow!("CUDA device {i} is not usable: no NVIDIA driver/GPU found (libcuda could not be loaded) or the index does not exist"))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: &str) -> Result<Device> {
    bail!(
        "this glmae-train was built without CUDA support; rebuild with `cargo build --release -p glmae-train --features cuda`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_backends_and_bad_names_are_errors() {
        assert!(base_device("cpu").is_ok());
        assert!(base_device("ndarray").is_ok());
        let e = base_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device \"tpu\""), "{e}");
        #[cfg(not(feature = "cuda"))]
        assert!(base_device("cuda:1").unwrap_err().to_string().contains("--features cuda"));
    }
}
