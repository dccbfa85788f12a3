//! Password and secret hashing with argon2.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Hashes a secret (PHC string with a random salt).
pub fn hash(secret: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(secret.as_bytes(), &salt).expect("argon2 with default parameters hashes any input").to_string()
}

/// Checks a secret against a PHC hash; a malformed hash never matches.
pub fn verify(secret: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(secret.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// Runs [`verify`] off the async runtime (argon2 takes tens of milliseconds by design).
pub async fn verify_blocking(secret: String, phc: String) -> bool {
    tokio::task::spawn_blocking(move || verify(&secret, &phc)).await.unwrap_or(false)
}

/// Runs [`hash`] off the async runtime.
pub async fn hash_blocking(secret: String) -> String {
    tokio::task::spawn_blocking(move || hash(&secret)).await.expect("hashing task does not panic")
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let h = super::hash("s3cret");
        assert!(super::verify("s3cret", &h));
        assert!(!super::verify("s3cret!", &h));
        assert!(!super::verify("s3cret", "not-a-hash"));
    }
}
