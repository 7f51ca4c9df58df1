//! `ntctl data`: load a data set as a training would (and fill the decoded
//! cache), export a known set as an image folder or arrays, and upload a
//! folder to the object store for `data.path: store:<prefix>`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use nt_common::{Storage, StorageArgs};
use nt_runtime::data::export::{in_folder_order, write_arrays, write_image_folder};
use nt_runtime::data::{self, DataCache, DirCache, FileSource, LoadOptions, LocalDir};
use serde::Serialize;

use super::train::DataArgs;
use crate::output::{describe_load, print_json, OutputFormat};

#[derive(Args)]
pub struct DataCmdArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Load a data set as a training of ARCH would: decode an image folder
    /// (or read it from the decoded cache) and report counts and timings.
    Load(LoadArgs),
    /// Write a data set as an image folder of PNG files or as .npy arrays
    /// (train/ and test/), in the layouts `image-folder:` and `arrays:` read.
    Export(ExportArgs),
    /// Copy a local folder to the object store under PREFIX, for
    /// `data.path: store:PREFIX`.
    Upload(UploadArgs),
}

#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    data: DataArgs,
    /// The architecture the data is for (its input shape is the decoded size).
    #[arg(long, default_value = "mlp")]
    arch: String,
    /// The decoded cache's folder (default: NT_DATA_CACHE, else ~/.cache/nt/data).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Decode without reading or writing the cache.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    ImageFolder,
    Arrays,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// The folder to write train/ and test/ into.
    #[arg(long)]
    out: PathBuf,
    /// Arrays: write the samples in the order an image-folder export of the
    /// same set is read (by class, then by index), so both train alike.
    #[arg(long)]
    in_folder_order: bool,
}

#[derive(Args)]
struct UploadArgs {
    /// The local folder (an image folder or arrays).
    dir: PathBuf,
    /// The key prefix to copy it under.
    prefix: String,
    #[command(flatten)]
    storage: StorageArgs,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
}

pub async fn run(args: DataCmdArgs, output: OutputFormat) -> Result<()> {
    match args.command {
        DataCommand::Load(a) => tokio::task::block_in_place(|| load(a, output)),
        DataCommand::Export(a) => tokio::task::block_in_place(|| export(a, output)),
        DataCommand::Upload(a) => upload(a, output).await,
    }
}

#[derive(Serialize)]
struct Loaded {
    name: String,
    shape: [usize; 3],
    classes: usize,
    class_names: Vec<String>,
    train: usize,
    valid: usize,
    test: usize,
    /// Wall time of the whole load (listing, decoding or cache, splitting).
    seconds: f64,
    load: Option<nt_runtime::data::LoadReport>,
}

fn load(args: LoadArgs, output: OutputFormat) -> Result<()> {
    let spec = args.data.spec()?;
    let arch = fusion::arch::resolve(&args.arch)?;
    let source = data::local_source(&spec)?;
    let cache = match (args.no_cache, args.cache_dir.or_else(DirCache::default_dir)) {
        (false, Some(dir)) => Some(DirCache(dir)),
        _ => None,
    };
    let options = LoadOptions {
        cache: cache.as_ref().map(|c| c as &dyn DataCache),
        ..LoadOptions::new(arch.input_shape())
    };
    let started = Instant::now();
    let splits = data::load_with(&spec, &source, &options)?;
    splits.check_fits(&arch)?;
    let report = Loaded {
        name: splits.name.clone(),
        shape: splits.train.shape,
        classes: splits.classes,
        class_names: splits.class_names.clone(),
        train: splits.train.len(),
        valid: splits.valid.as_ref().map_or(0, |v| v.len()),
        test: splits.test.len(),
        seconds: started.elapsed().as_secs_f64(),
        load: splits.loaded.clone(),
    };
    match output {
        OutputFormat::Json => print_json(&report)?,
        OutputFormat::Text => {
            println!(
                "{}: {} classes, images {:?}; {} train / {} validation / {} test in {:.2} s",
                report.name,
                report.classes,
                report.shape,
                report.train,
                report.valid,
                report.test,
                report.seconds
            );
            if let Some(loaded) = &splits.loaded {
                println!("{}", describe_load(loaded));
                for file in &loaded.skipped {
                    println!("  skipped {file}");
                }
            }
        }
    }
    Ok(())
}

fn export(args: ExportArgs, output: OutputFormat) -> Result<()> {
    let spec = args.data.spec()?;
    if spec.format.is_some() {
        bail!("export writes a known data set (fashion-mnist, cifar10, ...); `{}` is already your own", args.data.data);
    }
    let started = Instant::now();
    let splits = data::load_local(&spec)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for (name, set) in [("train", &splits.train), ("test", &splits.test)] {
        let dir = args.out.join(name);
        match args.format {
            ExportFormat::ImageFolder => write_image_folder(set, splits.classes, &dir, threads)?,
            ExportFormat::Arrays if args.in_folder_order => {
                write_arrays(&in_folder_order(set), &dir)?
            }
            ExportFormat::Arrays => write_arrays(set, &dir)?,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    match output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "out": args.out.display().to_string(),
            "train": splits.train.len(),
            "test": splits.test.len(),
            "seconds": seconds,
        }))?,
        OutputFormat::Text => println!(
            "wrote {} train and {} test images of `{}` to {} in {seconds:.1} s",
            splits.train.len(),
            splits.test.len(),
            splits.name,
            args.out.display()
        ),
    }
    Ok(())
}

async fn upload(args: UploadArgs, output: OutputFormat) -> Result<()> {
    use futures_util::StreamExt;
    let storage = Storage::open(&args.storage)?;
    let source = LocalDir(args.dir.clone());
    let files: Vec<_> = source.list("")?.into_iter().filter(|e| !e.is_dir).collect();
    if files.is_empty() {
        bail!("{} holds no files to upload", args.dir.display());
    }
    let prefix = args.prefix.trim_matches('/').to_string();
    let started = Instant::now();
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    let mut uploads = futures_util::stream::iter(files.iter().map(|f| {
        let (storage, prefix, path) = (&storage, &prefix, args.dir.join(&f.name));
        let key = format!("{prefix}/{}", f.name);
        async move {
            let body = tokio::fs::read(&path)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            storage
                .put(&key, Bytes::from(body))
                .await
                .with_context(|| format!("writing {key} to {}", storage.url))?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(args.parallel.max(1));
    while let Some(done) = uploads.next().await {
        done?;
    }
    let seconds = started.elapsed().as_secs_f64();
    match output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "prefix": prefix, "files": files.len(), "bytes": bytes, "seconds": seconds,
        }))?,
        OutputFormat::Text => println!(
            "uploaded {} files ({:.1} MiB) to {}/{prefix} in {seconds:.1} s; name it as data.path: store:{prefix}",
            files.len(),
            bytes as f64 / (1u64 << 20) as f64,
            storage.url
        ),
    }
    Ok(())
}
