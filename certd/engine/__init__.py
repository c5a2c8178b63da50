"""The use cases: plan a renewal, renew, roll back, revoke, recover; the effects a rotation drives."""
