//! Task placement by the run's device requirement, against a real `nt-server`
//! process: GPU runs reach only GPU workers, and the task a worker leases says
//! where the run asked it to run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

use nt_proto::v1 as pb;
use nt_testkit::cluster::{
    lease_task as lease, register_worker as register, serial, small_spec, submit, Cluster,
    StoreKind,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_runs_wait_for_gpu_workers_and_tasks_carry_the_device() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::Local);
    c.start_server();
    let mut wc = c.worker_client().await;
    let cpu_worker = register(&mut wc, "cpu", 0).await;
    let gpu_worker = register(&mut wc, "gpu", 1).await;

    let mut spec = small_spec(1, 1000);
    spec.device = pb::DeviceRequirement::Gpu as i32;
    submit(&c, spec, "").await;
    // The CPU worker's long poll ends empty although two tasks are queued.
    assert!(lease(&mut wc, &cpu_worker, 1500).await.is_none());
    let task = lease(&mut wc, &gpu_worker, 5000).await.expect("a GPU task");
    assert_eq!(task.device(), pb::DeviceRequirement::Gpu);

    // A CPU run goes to any worker, GPU workers included, and says CPU.
    let mut spec = small_spec(1, 1000);
    spec.device = pb::DeviceRequirement::Cpu as i32;
    spec.name = "cpu-run".into();
    let cpu_run = submit(&c, spec, "").await.run.unwrap().run_id;
    let task = loop {
        let t = lease(&mut wc, &gpu_worker, 5000).await.expect("a task");
        if t.run_id == cpu_run {
            break t;
        }
    };
    assert_eq!(task.device(), pb::DeviceRequirement::Cpu);
    // And the CPU worker may take the CPU run's other member.
    let task = lease(&mut wc, &cpu_worker, 5000).await.expect("a CPU task");
    assert_eq!(task.run_id, cpu_run);
    assert_eq!(task.device(), pb::DeviceRequirement::Cpu);
}
