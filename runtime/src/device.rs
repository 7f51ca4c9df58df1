//! Choosing a libtorch device, and loading libtorch's CUDA half on demand.
//!
//! `libtorch_cuda.so` is not referenced by any symbol we call, so a binary
//! linked "as needed" drops it and CUDA is silently unavailable. Binaries that
//! always run on GPUs (the worker) force-link it in their `build.rs`. `ntctl`
//! does not: loading the CUDA libraries costs ~350 MB of resident memory and
//! half a second at start-up, which offline fusion never needs. It loads them
//! here, before the first CUDA query, when a command asks for a GPU.

use std::sync::OnceLock;

use tch::Device;

use crate::{Result, RuntimeError};

static CUDA_LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Loads `libtorch_cuda.so` into the process (once). Must run before anything
/// asks libtorch about CUDA: libtorch caches its first answer.
pub fn load_cuda() -> std::result::Result<(), String> {
    CUDA_LOADED
        .get_or_init(|| {
            let name = c"libtorch_cuda.so";
            // SAFETY: dlopen with a valid C string; the handle is kept for the
            // life of the process (never dlclosed).
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if handle.is_null() {
                // SAFETY: dlerror returns a thread-local C string or null.
                let err = unsafe { libc::dlerror() };
                let msg = if err.is_null() {
                    "unknown dlopen error".to_string()
                } else {
                    // SAFETY: non-null dlerror results are valid C strings.
                    unsafe { std::ffi::CStr::from_ptr(err) }
                        .to_string_lossy()
                        .into_owned()
                };
                Err(format!(
                    "cannot load libtorch_cuda.so ({msg}); is the torch lib/ folder on LD_LIBRARY_PATH?"
                ))
            } else {
                Ok(())
            }
        })
        .clone()
}

/// Resolves `auto`, `cpu`, `cuda` or `cuda:N`. `auto` is the first GPU when
/// one is usable, else the CPU; asking for CUDA where there is none is an error.
pub fn parse_device(text: &str) -> Result<Device> {
    let cuda_count = || {
        if load_cuda().is_err() {
            return 0;
        }
        tch::Cuda::device_count() as usize
    };
    match text {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if cuda_count() > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        _ => {
            let index = match text.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| bad_device(text))?,
                None => return Err(bad_device(text)),
            };
            load_cuda().map_err(RuntimeError::Unsupported)?;
            let count = cuda_count();
            if index >= count {
                return Err(RuntimeError::Unsupported(format!(
                    "device `{text}` asked for, but libtorch sees {count} CUDA device(s)"
                )));
            }
            Ok(Device::Cuda(index))
        }
    }
}

fn bad_device(text: &str) -> RuntimeError {
    RuntimeError::spec(format!(
        "unknown device `{text}` (use auto, cpu, cuda or cuda:N)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_cuda_loads_without_a_gpu() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("gpu")
            .unwrap_err()
            .to_string()
            .contains("unknown device `gpu`"));
        assert!(parse_device("cuda:x").is_err());
        // The library loads on any machine with the torch wheel; without a GPU,
        // auto falls back to the CPU and cuda is a clear error.
        load_cuda().unwrap();
        let auto = parse_device("auto").unwrap();
        if tch::Cuda::device_count() == 0 {
            assert_eq!(auto, Device::Cpu);
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("0 CUDA device"), "{err}");
        }
    }
}
