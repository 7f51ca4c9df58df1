//! Built-in architectures, written as specs through [`SpecBuilder`]. A preset
//! is named `name` or `name:key=value,key=value` (for example
//! `mlp:hidden=1024,depth=2` or `resnet18:classes=100`).

use super::builder::Options;
pub use super::builder::{SpecBuilder, MAX_LAYERS, MAX_OPTION, MAX_STAGES};
use super::spec::ArchSpec;
use super::torchvision;
use crate::{FusionError, Result};

/// Preset names with a one-line description and their options.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "mlp",
        "flatten then Linear+ReLU layers fc1..fcN (input=1x28x28, hidden=512, depth=3, classes=10, bias=false)",
    ),
    (
        "lenet",
        "LeNet-5 for 28x28 inputs, feature.*/classifier.* names (channels=1, classes=10, bias=false)",
    ),
    (
        "lenet-cifar",
        "LeNet-5 for 32x32 inputs, conv1/conv2/fc1..fc3 names (channels=3, classes=10, bias=false)",
    ),
    (
        "vgg11",
        "VGG11 for 32x32 inputs, features.*/classifier (channels=3, classes=10, width=64, bias=false); \
         layout=torchvision: torchvision's (size=32, width=64, hidden=4096, dropout=0.5)",
    ),
    (
        "vgg11-bn",
        "VGG11 with BatchNorm after every conv (options of vgg11)",
    ),
    (
        "vgg16",
        "VGG16, torchvision's layout: 7x7 adaptive pool, 4096-4096 classifier (channels=3, classes=10, size=32, width=64, hidden=4096, dropout=0.5)",
    ),
    ("vgg16-bn", "VGG16 with BatchNorm after every conv (options of vgg16)"),
    (
        "resnet18",
        "ResNet18, torchvision names (channels=3, classes=10, size=32, width=64, stem=cifar|imagenet)",
    ),
    ("resnet34", "ResNet34 of BasicBlocks (options of resnet18)"),
    ("resnet50", "ResNet50 of Bottleneck blocks (options of resnet18)"),
    (
        "resnet",
        "ResNet, torchvision names (block=basic|bottleneck, blocks=2-2-2-2, width=64, channels=3, classes=10, size=32, stem=cifar|imagenet)",
    ),
    (
        "mobilenet_v2",
        "MobileNetV2, torchvision names: depthwise convs, ReLU6, inverted residuals (channels=3, classes=10, size=32, width_mult=1.0, dropout=0.2)",
    ),
];

/// Builds the spec of a preset such as `mlp` or `resnet18:classes=100`.
pub fn preset(text: &str) -> Result<ArchSpec> {
    let (name, args) = match text.split_once(':') {
        Some((n, a)) => (n, a),
        None => (text, ""),
    };
    let mut opts = Options::parse(name, args)?;
    let spec = match name {
        "mlp" => mlp(&mut opts)?,
        "lenet" => lenet_mnist(&mut opts)?,
        "lenet-cifar" => lenet_cifar(&mut opts)?,
        "vgg11" | "vgg11-bn" => {
            let bn = name == "vgg11-bn";
            if opts.choice("layout", &["cifar", "torchvision"])? == "torchvision" {
                torchvision::vgg(&mut opts, name, 11, bn)?
            } else {
                vgg11(&mut opts, bn)?
            }
        }
        "vgg16" => torchvision::vgg(&mut opts, name, 16, false)?,
        "vgg16-bn" => torchvision::vgg(&mut opts, name, 16, true)?,
        "resnet18" => resnet(&mut opts, "resnet18", Some(vec![2, 2, 2, 2]))?,
        "resnet34" => resnet(&mut opts, "resnet34", Some(vec![3, 4, 6, 3]))?,
        "resnet50" => torchvision::bottleneck_resnet(&mut opts, "resnet50", vec![3, 4, 6, 3])?,
        "resnet" => {
            if opts.choice("block", &["basic", "bottleneck"])? == "bottleneck" {
                let blocks = opts.list("blocks", '-', vec![3, 4, 6, 3])?;
                check_block_count("resnet", &blocks)?;
                torchvision::bottleneck_resnet(&mut opts, "resnet", blocks)?
            } else {
                resnet(&mut opts, "resnet", None)?
            }
        }
        "mobilenet_v2" => torchvision::mobilenet_v2(&mut opts)?,
        _ => {
            return Err(FusionError::UnknownPreset {
                name: crate::bounded(name.to_string()),
                known: PRESETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    opts.finish()?;
    Ok(spec)
}

fn mlp(o: &mut Options) -> Result<ArchSpec> {
    let input = o.list("input", 'x', vec![1, 28, 28])?;
    let hidden = o.usize("hidden", 512)?;
    let depth = o.layers("depth", 3)?;
    let classes = o.usize("classes", 10)?;
    let bias = o.bool("bias", false)?;
    Ok(mlp_spec(&input, hidden, depth, classes, bias))
}

/// Flatten, then `depth` hidden Linear+ReLU layers of `hidden` units and a
/// Linear output layer, named fc1..fc{depth+1} as in the paper's code.
pub fn mlp_spec(
    input: &[usize],
    hidden: usize,
    depth: usize,
    classes: usize,
    bias: bool,
) -> ArchSpec {
    let mut b = SpecBuilder::new("mlp", input.to_vec());
    b.flatten();
    let mut width = input.iter().product();
    for i in 1..=depth {
        b.linear(&format!("fc{i}"), width, hidden, bias).relu(None);
        width = hidden;
    }
    b.linear(&format!("fc{}", depth + 1), width, classes, bias);
    b.build()
}

fn lenet_mnist(o: &mut Options) -> Result<ArchSpec> {
    let channels = o.usize("channels", 1)?;
    let classes = o.usize("classes", 10)?;
    let bias = o.bool("bias", false)?;
    let mut b = SpecBuilder::new("lenet", vec![channels, 28, 28]);
    b.conv("feature.0", &[], channels, 6, 5, 1, 2, bias)
        .relu(None)
        .max_pool(2, 2, 0)
        .conv("feature.3", &[], 6, 16, 5, 1, 0, bias)
        .relu(None)
        .max_pool(2, 2, 0)
        .flatten()
        .linear("classifier.1", 400, 120, bias)
        .relu(None)
        .linear("classifier.3", 120, 84, bias)
        .relu(None)
        .linear("classifier.5", 84, classes, bias);
    Ok(b.build())
}

fn lenet_cifar(o: &mut Options) -> Result<ArchSpec> {
    let channels = o.usize("channels", 3)?;
    let classes = o.usize("classes", 10)?;
    let bias = o.bool("bias", false)?;
    let mut b = SpecBuilder::new("lenet-cifar", vec![channels, 32, 32]);
    b.conv("conv1", &[], channels, 6, 5, 1, 0, bias)
        .relu(None)
        .max_pool(2, 2, 0)
        .conv("conv2", &[], 6, 16, 5, 1, 0, bias)
        .relu(None)
        .max_pool(2, 2, 0)
        .flatten()
        .linear("fc1", 400, 120, bias)
        .relu(None)
        .linear("fc2", 120, 84, bias)
        .relu(None)
        .linear("fc3", 84, classes, bias);
    Ok(b.build())
}

fn vgg11(o: &mut Options, batch_norm: bool) -> Result<ArchSpec> {
    let channels = o.usize("channels", 3)?;
    let classes = o.usize("classes", 10)?;
    let width = o.usize("width", 64)?;
    let bias = o.bool("bias", false)?;
    // kuangliu/pytorch-cifar's VGG11 (the paper's): 0 = max pool.
    let cfg = [1, 0, 2, 0, 4, 4, 0, 8, 8, 0, 8, 8, 0];
    let name = if batch_norm { "vgg11-bn" } else { "vgg11" };
    let mut b = SpecBuilder::new(name, vec![channels, 32, 32]);
    let widths: Vec<usize> = cfg.iter().map(|&m| m * width).collect();
    let c_in = torchvision::vgg_features(&mut b, &widths, channels, batch_norm, bias);
    b.flatten().linear("classifier", c_in, classes, bias);
    Ok(b.build())
}

fn check_block_count(name: &str, blocks: &[usize]) -> Result<()> {
    if blocks.iter().sum::<usize>() > MAX_LAYERS {
        return Err(FusionError::spec(format!(
            "preset `{name}`: option blocks has more than {MAX_LAYERS} blocks in all"
        )));
    }
    Ok(())
}

fn resnet(o: &mut Options, name: &str, fixed_blocks: Option<Vec<usize>>) -> Result<ArchSpec> {
    let blocks = match fixed_blocks {
        Some(b) => b,
        None => o.list("blocks", '-', vec![2, 2, 2, 2])?,
    };
    check_block_count(name, &blocks)?;
    let width = o.usize("width", 64)?;
    let channels = o.usize("channels", 3)?;
    let classes = o.usize("classes", 10)?;
    let size = o.usize("size", 32)?;
    let stem = o.choice("stem", &["cifar", "imagenet"])?;
    Ok(resnet_spec(
        name,
        &blocks,
        width,
        channels,
        classes,
        size,
        stem == "imagenet",
    ))
}

/// A torchvision-style ResNet of BasicBlocks: stage i has `blocks[i]` blocks
/// of `width * 2^i` channels, stride 2 from the second stage on. The CIFAR
/// stem is a 3x3 conv without max pool; the ImageNet stem is torchvision's.
pub fn resnet_spec(
    name: &str,
    blocks: &[usize],
    width: usize,
    channels: usize,
    classes: usize,
    size: usize,
    imagenet_stem: bool,
) -> ArchSpec {
    let mut b = SpecBuilder::new(name, vec![channels, size, size]);
    let mut last = torchvision::stem(&mut b, channels, width, imagenet_stem);
    let mut c_in = width;
    for (stage, &count) in blocks.iter().enumerate() {
        let c_out = width << stage;
        for block in 0..count {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            let p = format!("layer{}.{block}", stage + 1);
            b.conv(
                &format!("{p}.conv1"),
                &[&last],
                c_in,
                c_out,
                3,
                stride,
                1,
                false,
            )
            .batch_norm(&format!("{p}.bn1"), c_out)
            .relu(None)
            .conv(&format!("{p}.conv2"), &[], c_out, c_out, 3, 1, 1, false)
            .batch_norm(&format!("{p}.bn2"), c_out);
            torchvision::residual(&mut b, &p, &last, &format!("{p}.bn2"), c_in, c_out, stride);
            last = format!("{p}.out");
            c_in = c_out;
        }
    }
    torchvision::resnet_head(&mut b, c_in, classes);
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Architecture;

    #[test]
    fn every_preset_validates() {
        for (name, _) in PRESETS {
            let a = Architecture::new(preset(name).unwrap()).unwrap();
            assert!(!a.params().is_empty(), "{name}");
        }
    }

    #[test]
    fn resnet18_has_torchvision_parameters() {
        let a = Architecture::new(preset("resnet18").unwrap()).unwrap();
        // torchvision's resnet18 with a 10-class head and a 3x3 stem.
        assert_eq!(a.parameter_count(), 11_173_962);
        let names: Vec<String> = a.params().into_iter().map(|p| p.name).collect();
        assert!(names.contains(&"layer4.1.bn2.running_var".to_string()));
        assert!(names.contains(&"layer3.0.downsample.0.weight".to_string()));
        let imagenet =
            Architecture::new(preset("resnet18:stem=imagenet,size=224,classes=1000").unwrap())
                .unwrap();
        assert_eq!(imagenet.parameter_count(), 11_689_512);
    }

    #[test]
    fn options_are_checked() {
        let a = Architecture::new(preset("mlp:input=3072,hidden=64,depth=2,bias=true").unwrap())
            .unwrap();
        assert_eq!(
            a.parameter_count(),
            3072 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
        );
        let err = preset("mlp:hiden=3").unwrap_err().to_string();
        assert!(err.contains("hiden"), "{err}");
        let err = preset("mlp:hidden=zero").unwrap_err().to_string();
        assert!(err.contains("hidden=zero"), "{err}");
        let err = preset("alexnet").unwrap_err().to_string();
        assert!(err.contains("alexnet") && err.contains("resnet18"), "{err}");
    }

    /// Found by fuzzing: `resnet:blocks=40737095516100` built 40 trillion
    /// blocks (the coordinator ran out of memory validating a submission),
    /// `vgg11:width=...` overflowed a multiplication, and a long `blocks`
    /// list overflowed a shift.
    #[test]
    fn sizes_and_layer_counts_are_bounded() {
        for text in [
            "resnet:blocks=40737095516100",
            "resnet:blocks=600-600",
            "resnet:blocks=1-1-1-1-1-1-1-1-1",
            "mlp:depth=1000000000",
            "vgg11:width=4611686018427387904",
            "mlp:hidden=16777217",
            "mlp:input=16777217x1x1",
        ] {
            let started = std::time::Instant::now();
            let err = preset(text).unwrap_err().to_string();
            assert!(started.elapsed().as_secs() < 1, "{text}");
            assert!(
                err.contains("at most")
                    || err.contains("more than 1024")
                    || err.contains("to 16777216"),
                "{text}: {err}"
            );
        }
        assert!(preset("resnet:blocks=2-2-2-2,width=8").is_ok());
        assert!(preset("mlp:hidden=16777216,depth=2").is_ok());
    }
}
