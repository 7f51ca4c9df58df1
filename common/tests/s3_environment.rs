//! The S3 client reads AWS's standard environment. A test binary of its own:
//! it sets process-wide variables, which no other test may see.

use nt_common::storage::{Storage, StorageArgs};
use object_store::aws::AmazonS3ConfigKey;

#[test]
fn s3_credentials_come_from_the_standard_environment_under_the_flags() {
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            std::env::remove_var(k);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "projected-service-account-token").unwrap();
    // What the EKS webhook injects for IAM roles for service accounts, plus
    // a session token as temporary credentials carry.
    std::env::set_var("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/nt");
    std::env::set_var("AWS_WEB_IDENTITY_TOKEN_FILE", &token_file);
    std::env::set_var("AWS_REGION", "eu-central-1");
    std::env::set_var("AWS_SESSION_TOKEN", "session-token");

    let args = StorageArgs {
        url: "s3://nt-runs/prod".into(),
        ..StorageArgs::local(dir.path())
    };
    let b = args.s3_builder("nt-runs");
    let value = |k| b.get_config_value(&k);
    assert_eq!(
        value(AmazonS3ConfigKey::RoleArn).as_deref(),
        Some("arn:aws:iam::123456789012:role/nt")
    );
    assert_eq!(
        value(AmazonS3ConfigKey::WebIdentityTokenFile).as_deref(),
        token_file.to_str()
    );
    assert_eq!(
        value(AmazonS3ConfigKey::Region).as_deref(),
        Some("eu-central-1")
    );
    assert_eq!(
        value(AmazonS3ConfigKey::Token).as_deref(),
        Some("session-token")
    );
    assert_eq!(value(AmazonS3ConfigKey::AccessKeyId), None);
    // Opening the store contacts neither S3 nor STS.
    let store = Storage::open(&args).unwrap();
    assert_eq!(store.bucket.as_deref(), Some("nt-runs"));
    assert_eq!(store.prefix, "prod");

    // An explicit flag wins over the environment.
    let flagged = StorageArgs {
        s3_region: Some("us-west-2".into()),
        ..args.clone()
    };
    let b = flagged.s3_builder("nt-runs");
    assert_eq!(
        b.get_config_value(&AmazonS3ConfigKey::Region).as_deref(),
        Some("us-west-2")
    );

    // A blank key (say, an empty Secret value) is an error, not credentials.
    std::env::set_var("AWS_ACCESS_KEY_ID", "");
    let e = Storage::open(&args).unwrap_err().to_string();
    assert!(e.contains("AWS_ACCESS_KEY_ID is set but empty"), "{e}");
}
