//! Activation (gradient) checkpointing for candle models.
//!
//! candle's autograd keeps every intermediate tensor of a forward pass alive
//! until `backward`, so training memory grows with the depth of the network.
//! Checkpointing (Chen et al., "Training Deep Nets with Sublinear Memory
//! Cost", 2016) keeps only the outputs of coarse units (a ResNet block, a
//! transformer block) and recomputes each unit's internals during the
//! backward pass, trading one extra forward for most of the activation
//! memory.
//!
//! candle has no hook to recompute inside `Tensor::backward`, so the backward
//! pass is driven here: [`Tape`] records every unit with its inputs, runs it
//! once keeping only the (detached) output, and [`Tape::backward`] walks the
//! units in reverse, re-running each on its saved inputs with gradient
//! tracking and back-propagating the incoming gradient through it alone
//! (`d/dθ sum(unit(x) * g)`). Parameter gradients add up across units and
//! input gradients flow to the units that produced the inputs.
//!
//! Model code is written once against [`Exec`]: [`Direct`] runs units as
//! plain calls (the ordinary graph), [`Tape`] checkpoints them.

use std::collections::HashMap;

use candle_core::{Result, Tensor, TensorId, Var};

/// One unit of computation: its input tensors in, its output out.
pub type Unit<'a> = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>;

/// How a model runs its units.
pub trait Exec<'a> {
    /// Runs `f` on `inputs` and returns its output.
    fn unit(&mut self, inputs: &[&Tensor], f: Unit<'a>) -> Result<Tensor>;
}

/// Runs every unit directly: the ordinary forward pass, whose graph (on a
/// differentiable pass) reaches back through every unit.
#[derive(Clone, Copy, Debug, Default)]
pub struct Direct;

impl<'a> Exec<'a> for Direct {
    fn unit(&mut self, inputs: &[&Tensor], f: Unit<'a>) -> Result<Tensor> {
        let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        f(&owned)
    }
}

struct Slot {
    value: Tensor,
    /// Produced by a recorded unit (gradients flow into it); `false` for
    /// inputs from outside the tape, which are treated as constants.
    produced: bool,
}

struct Recorded<'a> {
    inputs: Vec<usize>,
    output: usize,
    run: Unit<'a>,
}

/// A checkpointing executor: records units and keeps only their outputs.
///
/// Tensors that enter a unit without having come out of an earlier unit are
/// constants: no gradient is computed for them. So everything that needs a
/// gradient (besides the parameters passed to [`Tape::backward`]) must be
/// computed inside a unit.
#[derive(Default)]
pub struct Tape<'a> {
    slots: Vec<Slot>,
    by_id: HashMap<TensorId, usize>,
    units: Vec<Recorded<'a>>,
}

impl<'a> Tape<'a> {
    /// An empty tape.
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            by_id: HashMap::new(),
            units: Vec::new(),
        }
    }

    /// Units recorded so far.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// Whether no unit has been recorded.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    fn slot_of(&mut self, t: &Tensor) -> usize {
        if let Some(&i) = self.by_id.get(&t.id()) {
            return i;
        }
        let value = t.detach();
        let i = self.slots.len();
        self.by_id.insert(t.id(), i);
        self.by_id.insert(value.id(), i);
        self.slots.push(Slot {
            value,
            produced: false,
        });
        i
    }

    /// Back-propagates `grad` (the gradient of the loss with respect to
    /// `output`, a tensor returned by one of the recorded units) through
    /// every unit, re-running each once. Returns the gradient of each of
    /// `params` (variables' tensors), `None` where the output does not
    /// depend on it.
    pub fn backward(
        &self,
        output: &Tensor,
        grad: &Tensor,
        params: &[&Tensor],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(&out) = self.by_id.get(&output.id()) else {
            candle_core::bail!("checkpointing: the output tensor was not produced on this tape");
        };
        let mut slot_grads: Vec<Option<Tensor>> = vec![None; self.slots.len()];
        slot_grads[out] = Some(grad.detach());
        let mut param_grads: Vec<Option<Tensor>> = vec![None; params.len()];
        for unit in self.units.iter().rev() {
            let Some(g) = slot_grads[unit.output].take() else {
                // Nothing downstream depends on this unit's output.
                continue;
            };
            // Inputs produced by earlier units become fresh variables so the
            // re-run yields their gradients; constants stay as they are.
            let mut vars: Vec<Option<Var>> = Vec::with_capacity(unit.inputs.len());
            let mut ins: Vec<Tensor> = Vec::with_capacity(unit.inputs.len());
            for &i in &unit.inputs {
                let slot = &self.slots[i];
                if slot.produced {
                    let v = Var::from_tensor(&slot.value)?;
                    ins.push(v.as_tensor().clone());
                    vars.push(Some(v));
                } else {
                    ins.push(slot.value.clone());
                    vars.push(None);
                }
            }
            let y = (unit.run)(&ins)?;
            let g = g.to_dtype(y.dtype())?;
            let surrogate = (y * g)?.sum_all()?;
            let grads = surrogate.backward()?;
            for (acc, p) in param_grads.iter_mut().zip(params) {
                if let Some(gp) = grads.get(p) {
                    add_into(acc, gp)?;
                }
            }
            for (&i, v) in unit.inputs.iter().zip(&vars) {
                if let Some(v) = v {
                    if let Some(gi) = grads.get(v.as_tensor()) {
                        add_into(&mut slot_grads[i], gi)?;
                    }
                }
            }
        }
        Ok(param_grads)
    }
}

fn add_into(acc: &mut Option<Tensor>, g: &Tensor) -> Result<()> {
    let g = g.detach();
    *acc = Some(match acc.take() {
        Some(prev) => (prev + g)?,
        None => g,
    });
    Ok(())
}

impl<'a> Exec<'a> for Tape<'a> {
    fn unit(&mut self, inputs: &[&Tensor], f: Unit<'a>) -> Result<Tensor> {
        let idx: Vec<usize> = inputs.iter().map(|t| self.slot_of(t)).collect();
        let ins: Vec<Tensor> = idx.iter().map(|&i| self.slots[i].value.clone()).collect();
        // Only the detached output is kept: the unit's internal graph is
        // dropped here and rebuilt in `backward`.
        let y = f(&ins)?.detach();
        let i = self.slots.len();
        self.by_id.insert(y.id(), i);
        self.slots.push(Slot {
            value: y.clone(),
            produced: true,
        });
        self.units.push(Recorded {
            inputs: idx,
            output: i,
            run: f,
        });
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// y = w2 * tanh(w1 * x) + x through two units with a skip, checked
    /// against the ordinary graph.
    #[test]
    fn tape_gradients_equal_the_plain_graph() -> Result<()> {
        let dev = Device::Cpu;
        let w1 = Var::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev)?;
        let w2 = Var::new(&[[1.5f32, 0.5], [-0.75, 1.0]], &dev)?;
        let x = Tensor::new(&[[0.3f32, -0.7], [1.1, 0.2]], &dev)?;
        let run = |exec: &mut dyn Exec<'_>, w1: &Tensor, w2: &Tensor| -> Result<Tensor> {
            let (w1, w2) = (w1.clone(), w2.clone());
            let h = exec.unit(&[&x], Box::new(move |t| t[0].matmul(&w1)?.tanh()))?;
            exec.unit(
                &[&h, &x],
                Box::new(move |t| (t[0].matmul(&w2)? + &t[1])?.sqr()),
            )
        };
        let y = run(&mut Direct, w1.as_tensor(), w2.as_tensor())?;
        let loss = y.sum_keepdim(D::Minus1)?.sum_all()?;
        let plain = loss.backward()?;

        let mut tape = Tape::new();
        let y2 = run(&mut tape, w1.as_tensor(), w2.as_tensor())?;
        assert_eq!(tape.len(), 2);
        let ones = Tensor::ones_like(&y2)?;
        let grads = tape.backward(&y2, &ones, &[w1.as_tensor(), w2.as_tensor()])?;
        for (g, w) in grads.iter().zip([&w1, &w2]) {
            let Some(g) = g else {
                panic!("no gradient for a parameter");
            };
            let want = plain
                .get(w.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("no plain gradient".into()))?;
            let diff = (g - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "gradient differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn backward_refuses_a_foreign_output() -> Result<()> {
        let tape = Tape::new();
        let t = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?;
        assert!(tape.backward(&t, &t, &[]).is_err());
        Ok(())
    }
}
