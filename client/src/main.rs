fn main() {
    println!("cuda {}", tch::Cuda::is_available());
}
