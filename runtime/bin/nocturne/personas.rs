//! Personas: named system prompts (the seeds' chat system has three:
//! technical, casual, formal) in a TOML file, one table per persona with its
//! `system` prompt. The defaults ship in the binary (`personas.toml` beside
//! this file); a device may replace them with its own file: `--personas
//! FILE`, `NOCTURNE_PERSONAS`, or `personas.toml` in the state directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

/// The personas the binary ships.
const DEFAULTS: &str = include_str!("personas.toml");

/// Largest personas file read, bytes.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// One persona.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Persona {
    system: String,
}

/// Named system prompts.
#[derive(Debug)]
pub struct Personas(BTreeMap<String, Persona>);

impl Personas {
    /// Parses a personas file's text; `origin` names it in errors.
    ///
    /// # Errors
    /// Not TOML, an unknown key, a persona without `system` or with an empty one.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Personas> {
        let personas: BTreeMap<String, Persona> = toml::from_str(text).with_context(|| format!("{origin} is not a valid personas file"))?;
        if let Some((name, _)) = personas.iter().find(|(_, p)| p.system.trim().is_empty()) {
            bail!("{origin}: persona `{name}` has an empty system prompt");
        }
        Ok(Personas(personas))
    }

    /// The system prompt of `name`, or an error listing the personas there are.
    pub fn system(&self, name: &str) -> anyhow::Result<&str> {
        match self.0.get(name) {
            Some(p) => Ok(&p.system),
            None => bail!("no persona `{name}`; there are: {}", self.names().join(", ")),
        }
    }

    /// The persona names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Where the personas come from.
#[derive(Args, Clone, Default)]
pub struct PersonaArgs {
    /// Personas file (TOML: one table per persona with its `system` prompt); default: personas.toml in the state directory, else the built-in ones (technical, casual, formal).
    #[arg(long, env = "NOCTURNE_PERSONAS")]
    pub personas: Option<PathBuf>,
}

impl PersonaArgs {
    /// The personas: the named file, else `state_dir/personas.toml` when
    /// present, else the built-in defaults.
    ///
    /// # Errors
    /// The file cannot be read or is not a valid personas file.
    pub fn load(&self, state_dir: &Path) -> anyhow::Result<Personas> {
        let in_state = state_dir.join("personas.toml");
        let path = match &self.personas {
            Some(path) => path.clone(),
            None if in_state.is_file() => in_state,
            None => return Personas::parse(DEFAULTS, "the built-in personas"),
        };
        let text = nocturne::file_read::read_text(&path, MAX_FILE_BYTES)?;
        Personas::parse(&text, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_hold_three_personas() {
        let p = Personas::parse(DEFAULTS, "defaults").unwrap();
        assert_eq!(p.names(), ["casual", "formal", "technical"]);
        assert!(p.system("formal").unwrap().contains("formal"));
        assert!(p.system("pirate").unwrap_err().to_string().contains("there are: casual, formal, technical"));
    }

    #[test]
    fn bad_files_are_refused_by_name() {
        assert!(Personas::parse("[x]\nsystem = \"  \"\n", "f").unwrap_err().to_string().contains("persona `x` has an empty"));
        assert!(format!("{:#}", Personas::parse("[x]\nprompt = \"a\"\n", "f").unwrap_err()).contains("unknown field `prompt`"));
    }
}
