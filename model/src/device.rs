//! Compute devices: CPU always; `wgpu` and `cuda` only when built with those features.

use burn::tensor::Device;

use crate::Error;

/// Which device to run on, as named by `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// burn's pure-Rust `flex` CPU backend (multi-threaded, SIMD).
    Cpu,
    /// burn-wgpu (Vulkan, Metal, DX12; lavapipe for a software Vulkan device).
    Wgpu,
    /// burn-cuda.
    Cuda,
    /// burn's deprecated `ndarray` CPU backend (feature `ndarray`; for benchmarks).
    NdArray,
}

impl std::str::FromStr for DeviceKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "wgpu" => Ok(DeviceKind::Wgpu),
            "cuda" => Ok(DeviceKind::Cuda),
            "ndarray" => Ok(DeviceKind::NdArray),
            other => Err(Error::Device(format!(
                "unknown device {other:?} (expected cpu, wgpu, cuda or ndarray)"
            ))),
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::NdArray => "ndarray",
        })
    }
}

impl DeviceKind {
    /// Whether this build can use the device at all.
    pub fn compiled_in(self) -> bool {
        match self {
            DeviceKind::Cpu => true,
            DeviceKind::Wgpu => cfg!(feature = "wgpu"),
            DeviceKind::Cuda => cfg!(feature = "cuda"),
            DeviceKind::NdArray => cfg!(feature = "ndarray"),
        }
    }

    /// The inference device (no autodiff).
    pub fn device(self) -> Result<Device, Error> {
        match self {
            DeviceKind::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => Ok(Device::cuda(0)),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)] // measured against flex in BENCHMARKS.md only
            DeviceKind::NdArray => Ok(Device::ndarray()),
            #[allow(unreachable_patterns)]
            other => Err(Error::Device(format!(
                "this btm-node was built without the `{other}` feature; rebuild with `--features {other}`"
            ))),
        }
    }

    /// The training device (autodiff enabled).
    pub fn train_device(self) -> Result<Device, Error> {
        Ok(self.device()?.autodiff())
    }
}
