// The worker is the GPU component: libtorch_cuda.so is linked "as needed"
// and nothing references it directly, so the linker would drop it and CUDA
// would silently be unavailable. Force it in.
fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
    println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
}
