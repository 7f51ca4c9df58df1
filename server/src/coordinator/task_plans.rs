//! What a task attempt is given: the runbook's [`TaskPlan`] of a task, from
//! the run's plan and what the run has produced so far (member checkpoints,
//! fused models).

use nt_common::layout;
use nt_spec::task::Job;
use nt_spec::{EvalItem, MemberPlan, TaskPlan, TaskWork};

use super::runbook::Runbook;

impl Runbook {
    /// The resolved task of attempt `doc.tasks[i].attempt`.
    pub fn task_plan(&self, i: usize) -> TaskPlan {
        let t = &self.doc.tasks[i];
        let run = &self.doc.run_id;
        let plan = &self.plan;
        let job = match &t.work {
            TaskWork::Train { member } => Job::Train {
                config: match &plan.members {
                    MemberPlan::Train(configs) => configs[*member].clone(),
                    // Existing members are never trained; the plan's
                    // fine-tuning settings keep the message well-formed.
                    MemberPlan::Existing(_) => plan.fine_tune.clone(),
                },
            },
            TaskWork::FineTune { method, distilled } => {
                let mut config = plan.fine_tune.clone();
                if *distilled {
                    config.distill = plan.compare.distill;
                }
                Job::FineTune {
                    init: layout::fused(run, method.as_str()),
                    teachers: if config.distill.is_some() {
                        self.doc.member_keys.clone()
                    } else {
                        Vec::new()
                    },
                    config,
                }
            }
            // Member 0 trained on as it was trained: no teachers.
            TaskWork::Baseline => Job::FineTune {
                config: nt_spec::TrainConfig {
                    distill: None,
                    ..plan.fine_tune.clone()
                },
                init: self.doc.member_keys.first().cloned().unwrap_or_default(),
                teachers: Vec::new(),
            },
            TaskWork::Evaluate => Job::Evaluate {
                items: self.evaluation_items(),
            },
        };
        TaskPlan {
            task_id: self.task_id(t),
            run_id: run.clone(),
            attempt: t.attempt,
            label: t.work.label(),
            arch: plan.arch.clone(),
            data: plan.data.clone(),
            job,
            device: plan.device,
            eval_batch: plan.eval_batch,
            output_prefix: self.attempt_prefix(i, t.attempt),
            resume_state: t.resume.clone(),
        }
    }

    /// The members, their ensemble, every fused model right after fusion,
    /// and every model a fine-tuning task produced.
    fn evaluation_items(&self) -> Vec<EvalItem> {
        let item = |name: String, checkpoints: Vec<String>| EvalItem { name, checkpoints };
        let keys = &self.doc.member_keys;
        let mut items: Vec<EvalItem> = keys
            .iter()
            .enumerate()
            .map(|(m, k)| item(format!("member {m}"), vec![k.clone()]))
            .collect();
        items.push(item("ensemble".into(), keys.clone()));
        for f in &self.doc.fused {
            items.push(item(f.method.to_string(), vec![f.key.clone()]));
        }
        for (i, t) in self.doc.tasks.iter().enumerate() {
            if matches!(t.work, TaskWork::FineTune { .. } | TaskWork::Baseline) {
                if let (Some(name), Some(key)) = (t.work.model_name(), self.canonical_key(i)) {
                    items.push(item(name, vec![key]));
                }
            }
        }
        items
    }
}
