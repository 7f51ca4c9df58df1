use fusion::arch::{preset, Architecture};
use fusion::train::{init_network, Sgd, SgdConfig};
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};
fn main() {
    tch::set_num_threads(2);
    let arch = Architecture::new(preset("resnet18").unwrap()).unwrap();
    let net = init_network(&arch, Device::Cpu, 0).unwrap();
    let x = Tensor::randn([256, 3, 32, 32], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [256], (Kind::Int64, Device::Cpu));
    let mut sgd = Sgd::new(
        net.trainable().len(),
        SgdConfig {
            momentum: 0.9,
            weight_decay: 0.0,
            nesterov: false,
        },
    );
    let mut total = 0.0;
    for i in 0..6 {
        let t0 = Instant::now();
        let params = net.trainable();
        Sgd::zero_grad(&params).unwrap();
        let logits = net.forward_t(&x, true).unwrap();
        let loss = logits.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0);
        loss.backward();
        sgd.step(&params, 0.01).unwrap();
        if i > 0 {
            total += t0.elapsed().as_secs_f64();
        }
    }
    println!("rust mean step {:.3}", total / 5.0);
}
