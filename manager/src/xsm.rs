//! The XSM/FLASK fragment that lets exactly the allowed pairs of domain types share grants and event channels.
