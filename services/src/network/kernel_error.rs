//! The kernel's answer to a netlink request, named: an error of rtnetlink's made a
//! [`NetworkError`] that says which operation the kernel refused and with which errno.

use super::NetworkError;

/// The [`NetworkError`] for `e`, the failure of the netlink request `operation`
/// (`RTM_NEWQDISC tbf on 7`): the kernel's refusal as [`NetworkError::Kernel`] with its errno,
/// `EPERM` and `EACCES` as [`NetworkError::PermissionDenied`]. A failure without an errno (the
/// netlink connection is gone, or its answer could not be read) is a
/// [`NetworkError::Kernel`] with errno 0 and rtnetlink's own text.
pub(crate) fn kernel_error(operation: &str, e: rtnetlink::Error) -> NetworkError {
    let rtnetlink::Error::NetlinkError(message) = e else {
        return NetworkError::Kernel { operation: operation.into(), errno: 0, message: e.to_string() };
    };
    // The kernel sends the negated errno; `saturating_abs` keeps a hostile i32::MIN in range.
    let errno = message.raw_code().saturating_abs();
    let text = strerror(errno);
    if errno == libc::EPERM || errno == libc::EACCES {
        return NetworkError::PermissionDenied { operation: operation.into(), reason: text };
    }
    NetworkError::Kernel { operation: operation.into(), errno, message: text }
}

/// The C library's text for `errno` ("No such device"), without std's " (os error 19)".
fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.strip_suffix(&format!(" (os error {errno})")) {
        Some(bare) => bare.to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroI32;

    use rtnetlink::packet_core::ErrorMessage;

    use super::*;

    fn refused(code: i32) -> rtnetlink::Error {
        let mut m = ErrorMessage::default();
        m.code = NonZeroI32::new(code);
        rtnetlink::Error::NetlinkError(m)
    }

    /// The errno is the kernel's, positive, with its text; the operation is named.
    #[test]
    fn a_refusal_names_the_operation_and_the_errno() {
        assert_eq!(
            kernel_error("RTM_NEWQDISC tbf on 9", refused(-libc::ENODEV)),
            NetworkError::Kernel {
                operation: "RTM_NEWQDISC tbf on 9".into(),
                errno: libc::ENODEV,
                message: "No such device".into(),
            }
        );
        let NetworkError::Kernel { errno, .. } = kernel_error("x", refused(i32::MIN)) else {
            panic!("not a kernel error")
        };
        assert_eq!(errno, i32::MAX);
    }

    /// EPERM and EACCES are a permission the daemon lacks.
    #[test]
    fn eperm_and_eacces_are_permission_denied() {
        for code in [libc::EPERM, libc::EACCES] {
            assert_eq!(
                kernel_error("RTM_DELQDISC on 3", refused(-code)),
                NetworkError::PermissionDenied {
                    operation: "RTM_DELQDISC on 3".into(),
                    reason: strerror(code)
                }
            );
        }
    }

    /// A failure without an errno keeps rtnetlink's text.
    #[test]
    fn a_failure_without_an_errno_keeps_its_text() {
        let e = kernel_error("RTM_GETQDISC", rtnetlink::Error::RequestFailed);
        assert_eq!(
            e,
            NetworkError::Kernel {
                operation: "RTM_GETQDISC".into(),
                errno: 0,
                message: rtnetlink::Error::RequestFailed.to_string(),
            }
        );
    }
}
