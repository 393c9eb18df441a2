"""interplab.train"""
