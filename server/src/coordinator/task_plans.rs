//! What a task attempt is given and where it writes: the runbook's
//! [`TaskPlan`] of a task, from the run's plan and what the run has
//! produced so far (member checkpoints, fused models), and the keys its
//! output goes to.

use nt_common::layout;
use nt_spec::task::Job;
use nt_spec::{EvalItem, MemberPlan, TaskPlan, TaskWork, TrainConfig};

use super::runbook::Runbook;

impl Runbook {
    /// The resolved task of attempt `doc.tasks[i].attempt`. A joint task's
    /// job holds the plan of each model it trains, writing under that
    /// model's own attempt prefix; the joint epoch states are the joint
    /// task's own.
    pub fn task_plan(&self, i: usize) -> TaskPlan {
        let t = &self.doc.tasks[i];
        let run = &self.doc.run_id;
        let plan = &self.plan;
        let config = self
            .train_config(&t.work)
            .unwrap_or_else(|| plan.fine_tune.clone());
        let job = match &t.work {
            TaskWork::Train { .. } => Job::Train { config },
            TaskWork::FineTune { method, .. } => Job::FineTune {
                init: layout::fused(run, method.as_str()),
                teachers: if config.distill.is_some() {
                    self.doc.member_keys.clone()
                } else {
                    Vec::new()
                },
                config,
            },
            // Member 0 trained on as it was trained: no teachers.
            TaskWork::Baseline => Job::FineTune {
                config,
                init: self.doc.member_keys.first().cloned().unwrap_or_default(),
                teachers: Vec::new(),
            },
            TaskWork::Evaluate => Job::Evaluate {
                items: self.evaluation_items(),
            },
            TaskWork::Joint { .. } => Job::Joint {
                parts: self
                    .parts(i)
                    .into_iter()
                    .map(|j| TaskPlan {
                        resume_state: None,
                        ..self.task_plan(j)
                    })
                    .collect(),
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

    /// How the model of `work` trains (`None`: it does not).
    pub(super) fn train_config(&self, work: &TaskWork) -> Option<TrainConfig> {
        let plan = &self.plan;
        match work {
            TaskWork::Train { member } => Some(match &plan.members {
                MemberPlan::Train(configs) => configs.get(*member)?.clone(),
                // Existing members are never trained; the plan's
                // fine-tuning settings keep the message well-formed.
                MemberPlan::Existing(_) => plan.fine_tune.clone(),
            }),
            TaskWork::FineTune { distilled, .. } => {
                let mut config = plan.fine_tune.clone();
                if *distilled {
                    config.distill = plan.compare.distill;
                }
                Some(config)
            }
            TaskWork::Baseline => Some(TrainConfig {
                distill: None,
                ..plan.fine_tune.clone()
            }),
            TaskWork::Evaluate | TaskWork::Joint { .. } => None,
        }
    }

    /// Where an accepted result of task `i` goes (training and fine-tuning).
    pub fn canonical_key(&self, i: usize) -> Option<String> {
        let run = &self.doc.run_id;
        match &self.doc.tasks[i].work {
            TaskWork::Train { member } => Some(layout::member(run, *member)),
            TaskWork::FineTune {
                method,
                distilled: false,
            } => Some(layout::fine_tuned(run, method.as_str())),
            TaskWork::FineTune {
                method,
                distilled: true,
            } => Some(layout::fine_tuned_distilled(run, method.as_str())),
            TaskWork::Baseline => Some(layout::baseline(run)),
            TaskWork::Evaluate | TaskWork::Joint { .. } => None,
        }
    }

    /// The prefix an attempt of task `i` writes under.
    pub fn attempt_prefix(&self, i: usize, attempt: u32) -> String {
        layout::attempt_prefix(
            &self.doc.run_id,
            &self.doc.tasks[i].work.local_name(),
            attempt,
        )
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
