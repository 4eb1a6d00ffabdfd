//! ONNX graphs run by tract-onnx under the memory plan: today the recall
//! encoder, any graph whose inputs are token tensors tomorrow.
//!
//! Principal items: [`Graph`] (a loaded, optimised, runnable model with its
//! measured heap), [`GraphError`].
//!
//! Shapes: every input is an int64 tensor `[1, sequence]` (batch fixed at 1,
//! `sequence` a symbol bounded by the profile's maximum), so the graph is
//! optimised once at load for every length up to that maximum. The outputs are
//! read as float32.
//!
//! Invariants: the heap a graph keeps (its weights and plan) and the peak heap
//! of one run at the longest input are measured at load with the counting
//! allocator ([`crate::heap`]) and go into the memory plan; a later run whose
//! peak exceeds the measured one is an error ([`GraphError::OverPlan`]), not a
//! silent overrun. Runs are single-threaded (tract's default executor), which
//! is what makes the per-thread measurement exact.

use std::path::{Path, PathBuf};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::DimLike;

use crate::heap::{self, HeapUse};

/// Loading or running a graph failed.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// The file is missing, not ONNX, or tract cannot type or optimise it.
    #[error("{path}: cannot load the ONNX graph: {message}")]
    Load {
        /// The graph file.
        path: PathBuf,
        /// tract's error chain.
        message: String,
    },
    /// An input or output of the graph is not what the caller needs.
    #[error("{path}: {message}")]
    Shape {
        /// The graph file.
        path: PathBuf,
        /// What is wrong, naming the input or output.
        message: String,
    },
    /// A run failed inside tract.
    #[error("{path}: run failed: {message}")]
    Run {
        /// The graph file.
        path: PathBuf,
        /// tract's error chain.
        message: String,
    },
    /// An input longer than the length the graph was planned for.
    #[error("input of {len} tokens is longer than the {max} the graph was planned for")]
    TooLong {
        /// Tokens given.
        len: usize,
        /// The planned maximum.
        max: usize,
    },
    /// A run took more heap than the plan measured at load.
    #[error("{path}: a run took {used} bytes of heap, over the {planned} planned at load")]
    OverPlan {
        /// The graph file.
        path: PathBuf,
        /// Peak heap of this run, bytes.
        used: usize,
        /// Peak heap measured at load for the longest input, bytes.
        planned: usize,
    },
}

/// One output of a run: its shape and its values as float32, row-major.
pub type Output = (Vec<usize>, Vec<f32>);

/// A loaded ONNX graph, typed for `[1, sequence ≤ max_sequence]` int64 inputs,
/// optimised and ready to run.
pub struct Graph {
    path: PathBuf,
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<String>,
    max_sequence: usize,
    weights: HeapUse,
    run_peak: usize,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph").field("path", &self.path).field("inputs", &self.inputs).finish_non_exhaustive()
    }
}

impl Graph {
    /// Loads `path`, types its inputs as int64 `[1, S]` with `S ≤ max_sequence`,
    /// optimises it, and measures the heap it keeps and the peak of one run with
    /// every input at `max_sequence` tokens of `warmup_token` (the output
    /// values of that run are discarded).
    ///
    /// # Errors
    /// [`GraphError::Load`] for a missing, malformed or untypable file;
    /// [`GraphError::Run`] when the warm-up run fails.
    pub fn load(path: &Path, max_sequence: usize, warmup_token: i64) -> Result<Graph, GraphError> {
        let load_error = |e: TractError| GraphError::Load { path: path.to_owned(), message: format!("{e:#}") };
        let (weights, loaded) = heap::measure(|| -> Result<_, GraphError> {
            let mut model = tract_onnx::onnx().model_for_path(path).map_err(load_error)?;
            let sequence = model.sym("S");
            model.symbols.add_assertion(format!("S <= {max_sequence}")).map_err(load_error)?;
            model.symbols.add_assertion("S >= 1").map_err(load_error)?;
            let inputs = model.input_outlets().map_err(load_error)?.to_vec();
            let mut names = Vec::with_capacity(inputs.len());
            for (i, outlet) in inputs.iter().enumerate() {
                names.push(model.node(outlet.node).name.clone());
                let fact = InferenceFact::dt_shape(i64::datum_type(), tvec!(1.to_dim(), sequence.to_dim()));
                model.set_input_fact(i, fact).map_err(load_error)?;
            }
            let plan = model.into_optimized().and_then(|m| m.into_runnable()).map_err(load_error)?;
            Ok((plan, names))
        });
        let (plan, inputs) = loaded?;
        let mut graph = Graph { path: path.to_owned(), plan, inputs, max_sequence, weights, run_peak: usize::MAX };
        let longest = vec![warmup_token; max_sequence];
        let warmup: Vec<&[i64]> = graph.inputs.iter().map(|_| longest.as_slice()).collect();
        let (run, result) = graph.run_measured(&warmup);
        result?;
        graph.run_peak = run.peak;
        Ok(graph)
    }

    /// The graph file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The input names, in the graph's order.
    pub fn inputs(&self) -> &[String] {
        &self.inputs
    }

    /// The longest input the graph was planned for, tokens.
    pub fn max_sequence(&self) -> usize {
        self.max_sequence
    }

    /// Heap bytes the loaded graph keeps (weights, plan, constants).
    pub fn weight_bytes(&self) -> usize {
        self.weights.kept
    }

    /// Peak heap bytes while loading and optimising (the file's bytes, the
    /// decoded protobuf and the optimiser's copies; all but
    /// [`Graph::weight_bytes`] is freed before the first run).
    pub fn load_peak_bytes(&self) -> usize {
        self.weights.peak
    }

    /// Peak heap bytes of one run at the longest input, measured at load.
    pub fn run_peak_bytes(&self) -> usize {
        self.run_peak
    }

    /// Whether the heap figures were measured (the counting allocator is the
    /// global allocator); without it they are 0.
    pub fn is_measured(&self) -> bool {
        self.weights.kept > 0
    }

    /// Runs the graph on `inputs` (one slice per input, in [`Graph::inputs`]
    /// order, all the same length) and returns each output as `(shape, values)`.
    ///
    /// # Errors
    /// [`GraphError::TooLong`], [`GraphError::Shape`] for a wrong input count or
    /// unequal lengths, [`GraphError::Run`], and [`GraphError::OverPlan`] when
    /// the run's peak heap on this thread exceeded the one measured at load.
    pub fn run(&self, inputs: &[&[i64]]) -> Result<Vec<Output>, GraphError> {
        let (used, outputs) = self.run_measured(inputs);
        if used.peak > self.run_peak {
            return Err(GraphError::OverPlan { path: self.path.clone(), used: used.peak, planned: self.run_peak });
        }
        outputs
    }

    /// The width of output 0's last axis when the graph fixes it (the
    /// embedding size of a sentence encoder).
    pub fn output_width(&self) -> Option<usize> {
        let fact = self.plan.model().output_fact(0).ok()?;
        fact.shape.last()?.to_usize().ok()
    }

    /// [`Graph::run`] without the plan check, with the run's heap use.
    fn run_measured(&self, inputs: &[&[i64]]) -> (HeapUse, Result<Vec<Output>, GraphError>) {
        let len = inputs.first().map_or(0, |s| s.len());
        if inputs.len() != self.inputs.len() || inputs.iter().any(|s| s.len() != len) || len == 0 {
            return (HeapUse::default(), Err(GraphError::Shape {
                path: self.path.clone(),
                message: format!("the graph takes {} inputs of one length ≥ 1, got lengths {:?}", self.inputs.len(), inputs.iter().map(|s| s.len()).collect::<Vec<_>>()),
            }));
        }
        if len > self.max_sequence {
            return (HeapUse::default(), Err(GraphError::TooLong { len, max: self.max_sequence }));
        }
        let run_error = |e: TractError| GraphError::Run { path: self.path.clone(), message: format!("{e:#}") };
        heap::measure(|| -> Result<_, GraphError> {
            let tensors: TVec<TValue> = inputs
                .iter()
                .map(|values| Tensor::from_shape(&[1, len], values).map(TValue::from))
                .collect::<TractResult<_>>()
                .map_err(run_error)?;
            let outputs = self.plan.run(tensors).map_err(run_error)?;
            outputs
                .iter()
                .map(|t| {
                    let t = t.cast_to::<f32>()?;
                    Ok((t.shape().to_vec(), t.to_plain_array_view::<f32>()?.iter().copied().collect()))
                })
                .collect::<TractResult<Vec<_>>>()
                .map_err(run_error)
        })
    }
}
