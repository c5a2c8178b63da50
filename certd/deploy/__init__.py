"""Putting a version where software reads it: stage beside the old one, switch atomically,
prune; strict modes for the directories involved."""
